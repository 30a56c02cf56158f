"""The trainer with parallel.tensor 2 (torchrun, 2 CPU ranks, gloo) against one rank without
tensor parallelism: the same losses and gradient norms for 20 steps, and a checkpoint resumes
across layouts (T2 -> T1 -> T2) with the uninterrupted run's losses, consolidated and sharded
(checkpoint.format).

Tolerance: fp32, relative 1e-5 on the loss (tensor parallelism reorders the sums of the
attention/MLP outputs and the loss's partial sums; measured ~1e-7); gradient norms as the log
prints them (3 decimals) must be equal.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.trainer.trainer_runs import GRAD_NORM, REPO, Run, assert_close, checkpoint_steps, config, losses

pytestmark = pytest.mark.slow
STEPS = 20


def tp_config(corpus, folder, tensor: int, steps: int = STEPS, every: int = 10) -> dict:
    cfg = config(corpus, folder / "checkpoints", steps=steps, every=every, zero=1)
    cfg["parallel"] = {"tensor": tensor}
    return cfg


@pytest.fixture(scope="module")
def one_rank(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("t1")
    return Run(folder, tp_config(corpus, folder, 1), ranks=1).run()


@pytest.fixture(scope="module")
def tensor_two(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("t2")
    return Run(folder, tp_config(corpus, folder, 2), ranks=2).run()


def test_tensor_2_trains_like_one_rank(one_rank, tensor_two):
    reference = losses(one_rank)
    assert sorted(reference) == list(range(1, STEPS + 1)) and reference[STEPS] < reference[1] - 0.3
    assert_close(losses(tensor_two), reference)
    assert GRAD_NORM.findall(tensor_two.output()) == GRAD_NORM.findall(one_rank.output())
    assert "2 ranks (TP 2 x DP 1)" in tensor_two.output()
    # A tensor group reads one replica's samples: both ranks trained on the same ones.
    assert tensor_two.trace(0) and [r["indices"] for r in tensor_two.trace(0)] == [r["indices"] for r in tensor_two.trace(1)]
    meta = json.loads((tensor_two.folder / "checkpoints" / "step-00000020" / "metadata.json").read_text())
    assert (meta["world_size"], meta["tensor_parallel"]) == (2, 2)


def test_a_checkpoint_resumes_across_layouts(corpus, one_rank, tensor_two, tmp_path):
    # T2's step-10 checkpoint, resumed by T1 up to step 15, then by T2 again up to 20.
    folder = tmp_path / "changes"
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copytree(tensor_two.folder / "checkpoints" / "step-00000010", folder / "checkpoints" / "step-00000010")
    middle = Run(folder / "t1", tp_config(corpus, folder, 1, steps=15, every=5), ranks=1).run()
    assert "resumed from" in middle.output() and checkpoint_steps(folder / "checkpoints")[-1] == 15
    last = Run(folder / "t2", tp_config(corpus, folder, 2, steps=STEPS, every=5), ranks=2).run()
    resumed = {**losses(middle), **losses(last)}
    assert sorted(resumed) == list(range(11, STEPS + 1))
    assert_close(resumed, losses(one_rank))


def sharded(cfg: dict) -> dict:
    cfg["checkpoint"]["format"] = "sharded"
    return cfg


@pytest.fixture(scope="module")
def tensor_two_sharded(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("t2-sharded")
    return Run(folder, sharded(tp_config(corpus, folder, 2)), ranks=2).run()


def test_sharded_checkpoints_resume_across_layouts(corpus, one_rank, tensor_two_sharded, tmp_path):
    # Each rank wrote its own shard; the run trains as one rank does.
    assert_close(losses(tensor_two_sharded), losses(one_rank))
    written = tensor_two_sharded.folder / "checkpoints" / "step-00000010"
    meta = json.loads((written / "metadata.json").read_text())
    assert meta["layout"] == "sharded" and (meta["world_size"], meta["tensor_parallel"]) == (2, 2)
    assert sorted(n for n in meta["files"] if n.startswith("shard-")) == ["shard-00000.safetensors",
                                                                          "shard-00001.safetensors"]
    # T2's sharded step 10, resumed by one rank (DeepSpeed: consolidated, whatever the config
    # says) up to step 15, then by T2 again up to 20, which writes shards again.
    folder = tmp_path / "changes"
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copytree(written, folder / "checkpoints" / "step-00000010")
    middle = Run(folder / "t1", sharded(tp_config(corpus, folder, 1, steps=15, every=5)), ranks=1).run()
    assert "resumed from" in middle.output() and "writing consolidated checkpoints" in middle.output()
    assert "layout" not in json.loads((folder / "checkpoints" / "step-00000015" / "metadata.json").read_text())
    last = Run(folder / "t2", sharded(tp_config(corpus, folder, 2, steps=STEPS, every=5)), ranks=2).run()
    assert json.loads((folder / "checkpoints" / "step-00000020" / "metadata.json").read_text())["layout"] == "sharded"
    resumed = {**losses(middle), **losses(last)}
    assert sorted(resumed) == list(range(11, STEPS + 1))
    assert_close(resumed, losses(one_rank))


def test_a_world_that_holds_no_whole_pipeline_is_refused_at_start(corpus, tmp_path):
    cfg = tp_config(corpus, tmp_path, 1)
    cfg["parallel"] = {"pipeline": 2}  # tiny: 2 layers + 2 = 4 slots, 2 stages: a valid layout
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, "-m", "bloomrun.trainer.train", "--config", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "world size 1 is not a multiple of parallel.tensor x parallel.pipeline (1 x 2)" in done.stderr
