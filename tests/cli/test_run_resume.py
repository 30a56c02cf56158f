"""`bloomctl run` stopped with Ctrl-C, then killed outright, then run again: each time the
same command resumes from the newest complete checkpoint and the loss carries on from
where it was, not from the start."""

import signal

import pytest

from bloomrun.trainer import checkpoint as ckpt
from tests.cli.elastic_harness import (
    BLOOMCTL,
    Started,
    launcher_env,
    processes_mentioning,
    tiny_manifest,
    wait_until,
)

STEPS = 150
EVERY = 25


def newest_step(run_dir) -> int:
    found = ckpt.newest_complete(run_dir / "checkpoints")
    return found[1]["step"] if found else -1


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ctrl_c_then_kill_then_rerun_resumes_and_finishes_with_a_lower_loss(tmp_path):
    command = [BLOOMCTL, "run", str(tiny_manifest(tmp_path, steps=STEPS, every=EVERY))]
    run_dir = tmp_path / "runs" / "tiny"
    env = launcher_env()

    # 1. Ctrl-C mid-run: the trainer saves at the step it is on; nothing is left running.
    first = Started(command, tmp_path / "first.log", env, cwd=tmp_path)
    try:
        wait_until(lambda: first.last_step() >= 40, 180, "step 40 of the first run")
        first.signal(signal.SIGINT)
        assert first.wait(90) == 128 + signal.SIGINT, first.tail()
    finally:
        first.kill_all()
    stopped_at = newest_step(run_dir)
    assert stopped_at >= 40 and f"SIGTERM: checkpoint at step {stopped_at} saved" in first.text(), first.tail()
    assert "run the same command again to resume" in first.text()
    assert processes_mentioning(str(run_dir / "config.yaml")) == []
    start_loss = first.steps()[0][1]

    # 2. The same command resumes there; then everything is SIGKILLed (no chance to save).
    second = Started(command, tmp_path / "second.log", env, cwd=tmp_path)
    try:
        wait_until(lambda: second.last_step() >= stopped_at + EVERY + 5, 180, "a periodic checkpoint")
        killed_at = newest_step(run_dir)
    finally:
        second.kill_all()
    assert second.resumed_steps() == [stopped_at], second.tail()
    step_after, loss_after = second.steps()[0]
    assert step_after == stopped_at + 1
    assert loss_after < 0.7 * start_loss, (start_loss, loss_after)  # carried on, not restarted
    assert killed_at > stopped_at

    # 3. Again: resumes from the newest periodic checkpoint and completes.
    third = Started(command, tmp_path / "third.log", env, cwd=tmp_path)
    try:
        assert third.wait(240) == 0, third.tail()
    finally:
        third.kill_all()
    assert third.resumed_steps() == [killed_at], third.tail()
    assert third.steps()[0][0] == killed_at + 1 and third.steps()[-1][0] == STEPS
    assert f"training complete: {STEPS} steps" in third.text()
    assert third.steps()[-1][1] < 0.5 * start_loss
    assert newest_step(run_dir) == STEPS

    # The trained run exports for transformers, with the weights of its final checkpoint.
    export_and_compare(run_dir, tmp_path / "hf")


def export_and_compare(run_dir, out):
    import subprocess

    import torch
    from transformers import BloomForCausalLM

    from bloomrun.cli.export import load_config
    from bloomrun.trainer.model import build_model

    result = subprocess.run([BLOOMCTL, "export", str(run_dir), "--output", str(out)], capture_output=True, text=True)
    assert result.returncode == 0 and f"exported step {STEPS}" in result.stdout, result.stderr
    ours = build_model(load_config(run_dir / "config.yaml").model)
    ours.load_state_dict(ckpt.read_tensors(run_dir / "checkpoints" / f"step-{STEPS:08d}", "model.safetensors"))
    hf = BloomForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - ours.eval()(ids)).abs().max().item() <= 1e-4
