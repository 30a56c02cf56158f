"""One trainer per run folder: rank 0 holds an advisory lock on its checkpoint folder for the
life of its process, and workers die with the launcher that started them.

Why (issue 12): a SIGKILLed `bloomctl run` left torchrun and its workers running, re-parented
to init; the same command again started a second trainer that resumed an older checkpoint and
wrote into the same folder as the orphans. The lock is `flock` on
`<checkpoint.dir>/.trainer.lock`: the kernel releases it when the holding process dies however
it dies, so a stale lock never outlives its trainer, and the file names the holder (PID, host)
for the refusal's message.
On NFS, Linux emulates flock with byte-range locks, so two pods on different nodes pointed at
one checkpoint volume path are kept apart too.

Dying with the launcher is PR_SET_PDEATHSIG, Linux only (a no-op elsewhere). The kernel sends
the signal when the *thread* that forked the child exits, not the process; both launchers
here fork from their main thread (bloomctl's supervise(), torchrun's agent loop), which lives
as long as the process.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

LOCK_FILE = ".trainer.lock"
_PR_SET_PDEATHSIG = 1


class RunLocked(ValueError):
    """The run folder is in use by another trainer. A ValueError: like a bad config, it is the
    input's fault (checkpoint.dir points at a live run), so train.py refuses with exit 2."""


class RunLock:
    """The held lock: an open file whose flock the kernel drops when the process exits."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1

    def __del__(self) -> None:
        self.release()


def _open(path: Path) -> int:
    # Read-write: on NFS an exclusive lock needs a descriptor open for writing.
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def describe_holder(path: Path) -> str:
    """'pid 1234 on host h since 05:40:12 UTC' from what the holder wrote into the file."""
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if "pid" not in holder:
        return "a process that has not written its PID yet"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("since", 0)))
    return f"pid {holder['pid']} on host {holder.get('host', '?')} since {since}"


def refusal(folder: Path, holder: str) -> str:
    return (f"{folder} is in use by another trainer ({holder}); stop it first, or give this "
            "run another checkpoint folder")


def acquire(folder: Path) -> RunLock:
    """Lock `folder` for this process and record who holds it; RunLocked when another holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = _open(path)
    if not _try_lock(fd):
        os.close(fd)
        raise RunLocked(refusal(folder, describe_holder(path)))
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return RunLock(path, fd)


def holder(folder: Path) -> str | None:
    """Who holds `folder`'s lock now, or None when nobody does (the launcher's early check;
    the trainer's acquire() is what decides)."""
    path = folder / LOCK_FILE
    if not path.is_file():
        return None
    fd = _open(path)
    try:
        return None if _try_lock(fd) else describe_holder(path)
    finally:
        os.close(fd)  # drops the lock if we took it


# ------------------------------------------------------------------- parent death


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(signum: int) -> Callable[[], None]:
    """A Popen preexec_fn: the child gets `signum` when this (the parent's) thread exits.
    Resolved before the fork, so the child only calls prctl; a parent that died between the
    fork and the prctl is caught by comparing the parent PID."""
    prctl, parent = _prctl(), os.getpid()

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signum))
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)

    return preexec


def die_with_launcher(env=os.environ) -> None:
    """In a worker torchrun started: SIGKILL when torchrun dies. torchrun itself stops its
    workers on SIGTERM (they checkpoint); this covers a torchrun that is SIGKILLed or
    OOM-killed, whose workers would otherwise train on as orphans."""
    prctl = _prctl()
    if prctl is not None and "TORCHELASTIC_RUN_ID" in env:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
