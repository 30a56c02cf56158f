"""The run folder's lock with real processes: a second holder is refused with the first one's
PID, and the kernel releases the lock when its holder dies, even by SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import pytest

from bloomrun.trainer import runlock

HOLD = """
import sys, time
from pathlib import Path
from bloomrun.trainer import runlock
lock = runlock.acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


def hold(folder) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_trainer_is_refused_naming_the_holder_and_gets_the_lock_once_it_dies(tmp_path):
    holder = hold(tmp_path / "checkpoints")
    try:
        with pytest.raises(runlock.RunLocked, match=rf"in use by another trainer \(pid {holder.pid} on host "):
            runlock.acquire(tmp_path / "checkpoints")
        assert f"pid {holder.pid}" in runlock.holder(tmp_path / "checkpoints")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert runlock.holder(tmp_path / "checkpoints") is None  # no stale lock after a SIGKILL
    lock = runlock.acquire(tmp_path / "checkpoints")
    assert f'"pid": {os.getpid()}' in (tmp_path / "checkpoints" / runlock.LOCK_FILE).read_text()
    lock.release()


def test_a_refusal_is_a_value_error_so_the_trainer_exits_2_with_one_line(tmp_path):
    holder = hold(tmp_path)
    try:
        with pytest.raises(ValueError) as refused:
            runlock.acquire(tmp_path)
        assert "\n" not in str(refused.value)
    finally:
        holder.kill()
        holder.wait()


def test_holder_does_not_create_the_folder_or_take_the_lock(tmp_path):
    assert runlock.holder(tmp_path / "nothing") is None and not (tmp_path / "nothing").exists()
    lock = runlock.acquire(tmp_path)
    assert "pid" in runlock.holder(tmp_path)  # asking does not steal it
    lock.release()
    assert runlock.holder(tmp_path) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_started_with_die_with_parent_dies_when_its_parent_is_sigkilled(tmp_path):
    # parent: starts a sleeping child with the preexec_fn, prints its PID, then sleeps.
    parent_code = (
        "import signal, subprocess, sys, time\n"
        "from bloomrun.trainer import runlock\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
        "                         preexec_fn=runlock.die_with_parent(signal.SIGTERM))\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and alive(child):
        time.sleep(0.05)
    assert not alive(child)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead, awaiting its reaper
    except FileNotFoundError:
        return False
