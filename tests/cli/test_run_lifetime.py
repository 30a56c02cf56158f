"""A run has one trainer (issue 12): killing `bloomctl run` however it dies leaves no torchrun
or worker behind, a second launcher on the same run folder is refused naming the holder's
PID while the first one lives, and the run folder is free again once it is gone."""

import json
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from bloomrun.trainer import runlock
from tests.cli.elastic_harness import (
    BLOOMCTL,
    Started,
    launcher_env,
    newest_checkpoint_step,
    tiny_manifest,
    wait_until,
)

STEPS = 400
EVERY = 100


def launched(run: Started) -> list[psutil.Process]:
    """torchrun and its workers under a bloomctl process."""
    return psutil.Process(run.pid).children(recursive=True)


def gone_within(processes: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """The processes still alive (zombies count as dead) after waiting up to `seconds`."""
    deadline = time.monotonic() + seconds
    alive = processes
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    return alive


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_launchers_leave_no_trainer_and_a_live_run_folder_is_refused(tmp_path):
    manifest = tiny_manifest(tmp_path, steps=STEPS, every=EVERY)
    run_dir = tmp_path / "runs" / "tiny"
    checkpoints = run_dir / "checkpoints"
    command = [BLOOMCTL, "run", str(manifest)]
    env = launcher_env()

    first = Started(command, tmp_path / "first.log", env, cwd=tmp_path)
    try:
        wait_until(lambda: first.last_step() >= 10, 180, "step 10 of the first run")
        processes = launched(first)
        rank0 = first.workers()[0].pid
        holder = json.loads((checkpoints / runlock.LOCK_FILE).read_text())
        assert holder["pid"] == rank0

        # 1. A second `bloomctl run` of the same folder is refused at once, naming the holder.
        second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stdout + second.stderr
        assert re.search(rf"in use by another trainer \(pid {rank0} on host ", second.stderr), second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr

        # 2. So is a trainer started on it directly (two pods pointed at one checkpoint path).
        trainer = [sys.executable, "-m", "bloomrun.trainer.train", "--config", str(run_dir / "config.yaml")]
        direct = subprocess.run(trainer, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert direct.returncode == 2, direct.stderr[-2000:]
        assert f"in use by another trainer (pid {rank0} " in direct.stderr.strip().splitlines()[-1]

        # 3. SIGKILL of bloomctl: the kernel SIGTERMs torchrun, which stops its workers the way
        # Ctrl-C does (they save a checkpoint); nothing of the run is left a few seconds later.
        killed_at = first.last_step()
        first.signal(signal.SIGKILL)
        assert gone_within(processes, 20) == []
    finally:
        first.kill_all()
    assert runlock.holder(checkpoints) is None  # the kernel dropped the lock with its holder
    assert newest_checkpoint_step(checkpoints) >= killed_at  # stopped with a checkpoint, nothing lost

    # 4. The same command resumes; SIGKILL of torchrun itself takes its workers with it.
    third = Started(command, tmp_path / "third.log", env, cwd=tmp_path)
    try:
        wait_until(lambda: third.resumed_steps() and third.steps_since_last_start(), 180,
                   "the resumed run's first step")
        torchrun = [p for p in launched(third) if "torch.distributed.run" in " ".join(p.cmdline())]
        workers = third.workers()
        assert len(torchrun) == 1 and len(workers) == 2
        torchrun[0].send_signal(signal.SIGKILL)
        assert gone_within(workers, 10) == []
        assert third.wait(30) != 0
    finally:
        third.kill_all()
    assert runlock.holder(checkpoints) is None
