"""Each rank's heartbeat: a small record in shared memory that the node's watchdog reads.

Every rank beats at the same points of every step (its start, each micro-batch, the agreed
end) and at the start and end of each checkpoint save or load, so the number of beats
is comparable across the ranks of a group: a rank stuck in its own work is *behind* peers
that wait for it inside a collective. A beat is one `struct.pack_into` on an mmap'd file in
/dev/shm (about a microsecond, no system call): cheap enough for every micro-batch, and it
outlives a stopped or hung writer, whose last record is exactly what the watchdog needs.

Standard library only: the watchdog process reads these records without importing torch.
"""

from __future__ import annotations

import mmap
import os
import shutil
import statistics
import struct
import tempfile
import time
from collections import deque
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Phases: what a rank is doing, which decides how long it may go without a beat (watchdog.py).
# (Evaluation runs in Jobs of its own, off the training ranks: it is no phase of theirs.)
STARTUP, STEP, CHECKPOINT, DONE = range(4)
PHASE_NAMES = ("start-up", "step", "checkpoint", "done")

# seq, rank, pid, phase, beats, step, time (unix), last step's compute seconds, median step
# seconds, seq again: a reader that sees two different seqs read a record being written.
_FORMAT = struct.Struct("<QIIB7xQqdddQ")
RECORD_SIZE = _FORMAT.size
MEDIAN_WINDOW = 50  # steps: the median of the recent ones follows a ramp-up, ignores one slow step


@dataclass(frozen=True)
class Record:
    rank: int
    pid: int
    phase: int
    beats: int
    step: int
    time: float
    """Unix time of the last beat (for messages; the watchdog times with its own clock)."""
    compute_seconds: float
    """This rank's compute in its last step, before its gradient reduction (a straggler's is longer)."""
    median_step_seconds: float
    """Median of the group's recent step times (0 before the first step)."""


class Heartbeat:
    """One rank's record, written in place."""

    def __init__(self, path: Path, rank: int):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, RECORD_SIZE)
            self._map = mmap.mmap(fd, RECORD_SIZE)
        finally:
            os.close(fd)
        self.path, self.rank, self.pid = path, rank, os.getpid()
        self.phase, self.beats, self.step = STARTUP, 0, 0
        self.compute_seconds = self.median_step_seconds = 0.0
        self._step_seconds: deque[float] = deque(maxlen=MEDIAN_WINDOW)
        self.beat()

    def beat(self, step: int | None = None, phase: int | None = None) -> None:
        self.beats += 1
        self.step = self.step if step is None else step
        self.phase = self.phase if phase is None else phase
        _FORMAT.pack_into(self._map, 0, self.beats, self.rank, self.pid, self.phase, self.beats, self.step,
                          time.time(), self.compute_seconds, self.median_step_seconds, self.beats)

    def step_done(self, step: int, seconds: float, compute_seconds: float) -> None:
        """The step every rank agreed on, its wall time and this rank's own compute time."""
        self._step_seconds.append(seconds)
        self.median_step_seconds = statistics.median(self._step_seconds)
        self.compute_seconds = compute_seconds
        self.beat(step, STEP)

    @contextmanager
    def phase_of(self, phase: int):
        """A checkpoint save or load: its own timeout, beats at its start and its end."""
        previous = self.phase
        self.beat(phase=phase)
        try:
            yield
        finally:
            self.beat(phase=previous)

    def close(self) -> None:
        self.beat(phase=DONE)
        self._map.close()


class NullHeartbeat:
    """Nobody watches (no torchrun, or the watchdog is off). It still keeps this rank's own
    compute time, which the rank's metrics export (a straggler shows without a watchdog too)."""

    def __init__(self, rank: int = 0):
        self.rank, self.compute_seconds = rank, 0.0

    def beat(self, step: int | None = None, phase: int | None = None) -> None:
        pass

    def step_done(self, step: int, seconds: float, compute_seconds: float) -> None:
        self.compute_seconds = compute_seconds

    @contextmanager
    def phase_of(self, phase: int):
        yield

    def close(self) -> None:
        pass


def read(path: Path) -> Record | None:
    """A consistent copy of a record, or None (absent, or being rewritten three times over)."""
    try:
        with open(path, "rb") as f:
            for _ in range(3):
                f.seek(0)
                raw = f.read(RECORD_SIZE)
                if len(raw) < RECORD_SIZE:
                    return None
                seq, rank, pid, phase, beats, step, stamp, compute, median, seq_end = _FORMAT.unpack(raw)
                if seq == seq_end:
                    return Record(rank, pid, phase, beats, step, stamp, compute, median)
    except OSError:
        return None
    return None


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank}"


def read_all(directory: Path, ranks: range) -> dict[int, Record]:
    found = {}
    for rank in ranks:
        record = read(rank_file(directory, rank))
        if record is not None:
            found[rank] = record
    return found


def remove_stale_dirs(base: Path) -> None:
    """Folders of groups whose torchrun agent is gone: a watchdog removes its own when it ends,
    but not when it is SIGKILLed with everything else (a test's clean-up, an OOM kill)."""
    for folder in base.glob("bloomrun-heartbeat-*"):
        try:
            os.kill(int(folder.name.split("-")[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass  # not ours to judge


def group_dir(env: Mapping[str, str], agent_pid: int) -> Path:
    """The folder of this node's worker group, the same for each of its local ranks: named by
    the torchrun agent (their parent), its restart count and the group's store port, so a
    restarted or re-formed group never reads its predecessor's records. In /dev/shm (memory)
    where there is one."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    restart, port = env.get("TORCHELASTIC_RESTART_COUNT", "0"), env.get("MASTER_PORT", "0")
    return base / f"bloomrun-heartbeat-{agent_pid}-{restart}-{port}"
