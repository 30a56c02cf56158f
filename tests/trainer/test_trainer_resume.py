"""Real torchrun runs on 2 CPU ranks (gloo): resume is exact, on any world size and ZeRO stage.

Exactness: a resumed run on the same world size must reproduce the uninterrupted run's
losses bit for bit (same reduction order, gloo is deterministic). Where the world size or
the ZeRO stage differs, gradients are summed in a different order, so losses must agree to
a relative 1e-5 (fp32), and the samples each step trains on must be identical.
"""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from tests.trainer.trainer_runs import Run, checkpoint_steps, config

pytestmark = pytest.mark.slow
FP32_RTOL = 1e-5


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """Uninterrupted: 2 ranks, ZeRO 1, 6 steps, checkpoints at 2, 4, 6."""
    folder = tmp_path_factory.mktemp("reference")
    return Run(folder, config(corpus, folder / "checkpoints")).run()


def seed_from(reference: Run, folder, step: int):
    """A checkpoint folder holding only the reference's checkpoint at `step`."""
    target = folder / "checkpoints"
    target.mkdir(parents=True)
    name = f"step-{step:08d}"
    shutil.copytree(reference.folder / "checkpoints" / name, target / name)
    return target


def assert_continues(resumed: Run, reference: Run, first_step: int, rtol: float | None) -> None:
    ref, got = reference.global_steps(), resumed.global_steps()
    assert sorted(got) == list(range(first_step, 7)), f"resumed run trained steps {sorted(got)}"
    for step in got:
        assert got[step]["indices"] == ref[step]["indices"], f"step {step} trained on other samples"
        if rtol is None:
            assert got[step]["loss"] == ref[step]["loss"], f"step {step}: {got[step]['loss']} != {ref[step]['loss']}"
        else:
            assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=rtol), f"step {step}"


def test_reference_run_learns_and_checkpoints(reference):
    steps = reference.global_steps()
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert steps[6]["loss"] < steps[1]["loss"] - 0.1, "loss did not fall"
    # Step k trains on the global samples [8(k-1), 8k): the data module's contract.
    assert all(steps[k]["indices"] == list(range(8 * (k - 1), 8 * k)) for k in steps)
    assert checkpoint_steps(reference.folder / "checkpoints") == [2, 4, 6]
    meta = json.loads((reference.folder / "checkpoints/step-00000006/metadata.json").read_text())
    assert (meta["step"], meta["consumed_samples"], meta["tokens"], meta["restarts"]) == (6, 48, 48 * 32, 0)
    assert set(meta["files"]) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors"}
    assert "step 6/6 | loss" in reference.output()


def test_killed_run_resumes_with_identical_batches_and_losses(corpus, reference, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    # The hook parks every rank after step 3, so the kill lands mid-run every time.
    killed = Run(tmp_path, config(corpus, checkpoints), env={"BLOOMRUN_TEST_HANG_AFTER_STEP": "3"}).start()
    killed.wait_for(lambda: len(killed.trace()) >= 3, what="step 3")
    killed.kill()
    newest = checkpoint_steps(checkpoints)[-1]
    assert newest == 2

    resumed = Run(tmp_path / "again", config(corpus, checkpoints)).run()
    assert f"resumed from {checkpoints}/step-{newest:08d}" in resumed.output()
    assert_continues(resumed, reference, newest + 1, rtol=None)
    meta = json.loads((checkpoints / "step-00000006/metadata.json").read_text())
    assert meta["restarts"] == 1


def test_one_rank_resumes_two_ranks_checkpoint_past_corrupt_ones(corpus, reference, tmp_path):
    """2 -> 1 ranks, same global batch; the two newer checkpoints are broken and skipped."""
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(reference.folder / "checkpoints", checkpoints)
    model_file = checkpoints / "step-00000006/model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-100])  # truncated
    (checkpoints / "step-00000004/metadata.json").unlink()  # never completed

    resumed = Run(tmp_path / "run", config(corpus, checkpoints), ranks=1).run()
    output = resumed.output()
    assert "skipping checkpoint" in output and "step-00000006/model.safetensors" in output
    assert "step-00000004: no metadata.json" in output
    assert "resumed from" in output and "step-00000002" in output
    assert_continues(resumed, reference, 3, rtol=FP32_RTOL)


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_zero_stage_loads_trains_and_saves(corpus, reference, tmp_path, zero):
    """Each stage loads the ZeRO-1 reference's step 2, trains to 6 on 2 ranks and saves:
    losses and the saved weights and moments match the reference's."""
    checkpoints = seed_from(reference, tmp_path, 2)
    resumed = Run(tmp_path / "run", config(corpus, checkpoints, zero=zero)).run()
    assert f"ZeRO {zero}" in resumed.output()
    assert_continues(resumed, reference, 3, rtol=FP32_RTOL)
    assert checkpoint_steps(checkpoints) == [2, 4, 6]
    for name in ("model.safetensors", "optimizer.safetensors"):
        ours = load_file(checkpoints / "step-00000006" / name)
        theirs = load_file(reference.folder / "checkpoints/step-00000006" / name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].allclose(theirs[key], rtol=1e-4, atol=1e-6), f"{name}:{key}"
