"""bf16 autocast on 2 CPU ranks under ZeRO 2, with the batch-size ramp-up changing the
engine's gradient accumulation between steps, and checkpoints by time instead of steps."""

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.trainer_runs import Run, checkpoint_steps, config, write_corpus

pytestmark = pytest.mark.slow


def test_bf16_zero2_run_ramps_the_batch_and_saves_by_time(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    checkpoints = tmp_path / "run" / "checkpoints"
    cfg = config(corpus, checkpoints, steps=4, zero=2, precision="bf16",
                 rampup={"start": 4, "increment": 4, "samples": 8})
    # Every 6 ms: every step takes longer, so every step saves; keepLast 3 prunes step 1.
    cfg["checkpoint"].update(everySteps=None, everyMinutes=0.0001)
    run = Run(tmp_path / "run", cfg).run()
    assert "bf16, ZeRO 2" in run.output()
    steps = run.global_steps()
    # 4 samples a step (accumulation 1) until 8 are consumed, then 8 (accumulation 2).
    assert [steps[k]["indices"] for k in (1, 2, 3, 4)] == [
        list(range(0, 4)), list(range(4, 8)), list(range(8, 16)), list(range(16, 24))]
    assert all(math.isfinite(s["loss"]) and s["applied"] for s in steps.values())
    saved = checkpoint_steps(checkpoints)
    # Only time can have saved before the end (everySteps is off); keepLast bounds the count.
    assert saved == [2, 3, 4], saved
    weights = load_file(checkpoints / "step-00000004/model.safetensors")
    assert all(t.dtype == torch.float32 and t.isfinite().all() for t in weights.values())
