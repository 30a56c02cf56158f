"""A real 2-rank run: poisoned data is skipped and rolled back, metrics are scraped over
HTTP while it trains, and SIGTERM ends it with a checkpoint."""

from __future__ import annotations

import json
import math
import re
import urllib.request
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.trainer.trainer_runs import Run, checkpoint_steps, config, write_corpus

pytestmark = pytest.mark.slow

TRAINER_METRICS = [  # docs/metrics.md, trainer table (GPU memory is absent on a CPU)
    "bloomrun_train_step", "bloomrun_train_target_steps", "bloomrun_train_tokens_total",
    "bloomrun_train_tokens_per_second", "bloomrun_train_samples_per_second", "bloomrun_train_model_tflops",
    "bloomrun_train_mfu_ratio", "bloomrun_train_loss", "bloomrun_train_learning_rate", "bloomrun_train_grad_norm",
    "bloomrun_train_skipped_steps_total", "bloomrun_train_rollbacks_total", "bloomrun_train_restarts",
    "bloomrun_checkpoint_last_step", "bloomrun_checkpoint_last_timestamp_seconds",
    "bloomrun_checkpoint_save_seconds", "bloomrun_checkpoint_interval_seconds",
]


def scrape(port_file: Path) -> dict[str, float]:
    port = int(port_file.read_text())
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r'^(bloomrun_\w+)\{namespace="local",node_rank="0",run="test"\} (\S+)$', line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def test_poisoned_steps_roll_back_metrics_scrape_and_sigterm_checkpoints(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    checkpoints = tmp_path / "run" / "checkpoints"
    cfg = config(corpus, checkpoints, steps=1000,
                 nanPolicy={"maxConsecutiveBadSteps": 2, "skipStepsAfterRollback": 1})
    # Samples 16-24 are on rank 0 only, in steps 3 and 4: rank 1 must skip with it.
    run = Run(tmp_path / "run", cfg, env={"BLOOMRUN_POISON_SAMPLES": "16:25"}).start()
    port_file = tmp_path / "run" / "metrics-port"
    run.wait_for(port_file.exists, what="the metrics port file")

    seen = {}

    def rolled_back_and_moved_on() -> bool:
        seen.update(scrape(port_file))
        return seen.get("bloomrun_train_rollbacks_total") == 1 and seen.get("bloomrun_train_step", 0) >= 5

    run.wait_for(rolled_back_and_moved_on, what="a rollback and step 5 in the metrics")
    assert set(TRAINER_METRICS) <= set(seen), set(TRAINER_METRICS) - set(seen)
    assert seen["bloomrun_train_skipped_steps_total"] == 2
    assert seen["bloomrun_train_target_steps"] == 1000
    assert math.isfinite(seen["bloomrun_train_loss"]) and seen["bloomrun_train_tokens_per_second"] > 0
    assert seen["bloomrun_checkpoint_last_step"] >= 2
    assert "bloomrun_gpu_memory_bytes" not in seen

    run.terminate()
    run.wait(timeout=120)
    output = run.output()
    stopped = re.search(r"SIGTERM: checkpoint at step (\d+) saved", output)
    assert stopped, output[-3000:]
    assert int(stopped.group(1)) == checkpoint_steps(checkpoints)[-1]

    # Both ranks refused the poisoned steps; after the rollback, step 3 trains on samples
    # from 40 on: the bad range [16, 32) plus one batch skipped.
    for rank in (0, 1):
        records = run.trace(rank)
        assert [(r["step"], r["applied"]) for r in records[:5]] == [(1, True), (2, True), (3, False), (4, False), (3, True)]
    steps = run.global_steps()
    assert steps[3]["indices"] == list(range(40, 48))
    assert "rollback 1: 2 bad steps in a row; back to checkpoint step 2, skipping samples [16, 40)" in output

    newest = checkpoints / f"step-{checkpoint_steps(checkpoints)[-1]:08d}"
    meta = json.loads((newest / "metadata.json").read_text())
    assert (meta["rollbacks"], meta["skipped_steps"], meta["skipped_ranges"]) == (1, 2, [[16, 40]])
    assert all(t.isfinite().all() for t in load_file(newest / "model.safetensors").values())


def test_a_rollback_replays_the_good_steps_after_the_checkpoint_and_skips_only_the_bad_range(tmp_path):
    """Checkpoint at step 2 (16 samples), step 3 good, steps 4-5 poisoned: the rollback goes
    back to step 2, trains samples 16-24 again (they were good) and skips exactly [24, 48):
    the two bad batches and one more. The samples trained in all are the uninterrupted
    order minus that range, and tokens count what was trained."""
    corpus = write_corpus(tmp_path / "corpus")
    checkpoints = tmp_path / "run" / "checkpoints"
    cfg = config(corpus, checkpoints, steps=6, every=2,
                 nanPolicy={"maxConsecutiveBadSteps": 2, "skipStepsAfterRollback": 1})
    run = Run(tmp_path / "run", cfg, env={"BLOOMRUN_POISON_SAMPLES": "24:40"}).run()
    records = run.trace(0)
    assert [(r["step"], r["applied"]) for r in records] == [
        (1, True), (2, True), (3, True), (4, False), (5, False), (3, True), (4, True), (5, True), (6, True)]
    steps = run.global_steps()
    trained = [i for s in sorted(steps) for i in steps[s]["indices"]]
    assert trained == [*range(0, 24), *range(48, 72)]  # uninterrupted order minus [24, 48)
    meta = json.loads((checkpoints / "step-00000006" / "metadata.json").read_text())
    assert meta["skipped_ranges"] == [[24, 48]] and meta["consumed_samples"] == 72
    assert meta["tokens"] == 48 * 32  # 48 samples trained, of 32 tokens
