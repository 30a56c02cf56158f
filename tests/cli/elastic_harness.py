"""Process plumbing for the tests that start real torchrun agents and trainers: start a
process group with its output in a file, read the trainer's log lines as they appear,
find and kill worker processes. `Started` is the suite's one launcher of trainer processes
(tests/trainer/trainer_runs.Run builds its torchrun launches on it)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from bloomrun.trainer.elastic import TRAINER_MODULE
from tests.cluster.processes import wait_until  # noqa: F401  (re-exported for the elastic tests)

REPO = Path(__file__).resolve().parents[2]
BLOOMCTL = str(Path(sys.executable).parent / "bloomctl")
DEMO_DATA = REPO / "examples" / "data"

STEP_LINE = re.compile(r"step (\d+)/(\d+) \| loss (\S+)")
RESUMED_LINE = re.compile(r"resumed from \S+: step (\d+)")
WORLD_LINE = re.compile(r"(\d+) ranks \(TP \d+ x DP \d+\) on ")  # the trainer's start line (trainer.py)


def tiny_manifest(tmp: Path, *, steps: int, every: int, name: str = "tiny") -> Path:
    """examples/tiny.yaml with a shorter run, frequent checkpoints, a log line every step and
    the demo data."""
    document = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    document["metadata"]["name"] = name
    spec = document["spec"]
    spec["data"]["tokenizer"] = str(DEMO_DATA / "tokenizer.json")
    for source in spec["data"]["sources"]:
        source["path"] = str(DEMO_DATA / Path(source["path"]).name)
    spec["training"]["trainSteps"] = steps
    # A run shorter than the example's 20-step warmup keeps its warmup within the run (a warmup
    # longer than the run is refused).
    run_tokens = steps * spec["training"]["globalBatchSize"] * 64  # tiny's sequence length
    spec["optim"]["warmupTokens"] = min(spec["optim"]["warmupTokens"], run_tokens)
    spec["checkpoint"]["everySteps"] = every
    spec["metrics"]["logEvery"] = 1  # the tests read every step's log line
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


class Started:
    """A process (and its session) whose stdout+stderr go to a file we can poll."""

    def __init__(self, command: list[str], log: Path, env: dict | None = None, cwd: Path | None = None):
        self.log = log
        self.started_at = time.monotonic()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def steps(self) -> list[tuple[int, float]]:
        """(step, loss) of every step line so far."""
        return [(int(m[1]), float(m[3])) for m in STEP_LINE.finditer(self.text())]

    def last_step(self) -> int:
        steps = self.steps()
        return steps[-1][0] if steps else -1

    def steps_since_last_start(self) -> list[int]:
        """Steps logged by the newest worker group (after its 'resumed from' line)."""
        text = self.text()
        starts = list(RESUMED_LINE.finditer(text))
        tail = text[starts[-1].end():] if starts else text
        return [int(m[1]) for m in STEP_LINE.finditer(tail)]

    def resumed_steps(self) -> list[int]:
        return [int(m[1]) for m in RESUMED_LINE.finditer(self.text())]

    def world_sizes(self) -> list[int]:
        return [int(m[1]) for m in WORLD_LINE.finditer(self.text())]

    def workers(self) -> list[psutil.Process]:
        return trainer_workers(self.pid)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.proc.args[:3]} still running after {timeout:.0f} s:\n{self.tail()}") from None

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def kill_all(self) -> None:
        """SIGKILL the process and everything under it (the test's clean-up)."""
        kill_tree(self.pid)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def trainer_workers(root_pid: int) -> list[psutil.Process]:
    """The trainer processes under a launcher, by local rank (torchrun starts them in order)."""
    try:
        descendants = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    workers = []
    for process in descendants:
        try:
            command = " ".join(process.cmdline())
            # torchrun's own command line names the trainer module too
            if TRAINER_MODULE in command and "torch.distributed.run" not in command:
                workers.append(process)
        except psutil.NoSuchProcess:
            continue
    return sorted(workers, key=lambda p: p.create_time())


def kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        processes = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def launcher_env() -> dict[str, str]:
    """The suite's environment plus a shared torch-extension cache (the JIT build of
    DeepSpeed's CPU op is done once per checkout, not once per test)."""
    env = dict(os.environ)
    env.setdefault("BLOOMRUN_CACHE", str(REPO / ".cache"))
    return env


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line contains `text` (a run's config path)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if text in " ".join(process.info["cmdline"] or []):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def newest_checkpoint_step(checkpoint_dir: Path) -> int:
    from bloomrun.trainer import checkpoint as ckpt

    found = ckpt.newest_complete(checkpoint_dir)
    return found[1]["step"] if found else -1


def complete_checkpoint_steps(checkpoint_dir: Path) -> set[int]:
    from bloomrun.trainer import checkpoint as ckpt

    return {step for step, path in ckpt.list_checkpoints(checkpoint_dir) if (path / ckpt.METADATA).is_file()}


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \[rank \d+\]", re.M)


def trainer_events(*runs: Started) -> list[tuple[str, str, int]]:
    """(time, kind, value) from the trainer log lines of several launchers, in time order:
    kind 'world' (ranks at a start), 'resumed' (step), 'step' (step). Rank 0 logs, and
    which launcher holds rank 0 can change between restarts, so all logs are merged."""
    events = []
    for run in runs:
        for line in run.text().splitlines():
            stamp = LOG_TIME.match(line)
            if not stamp:
                continue
            for kind, pattern in (("world", WORLD_LINE), ("resumed", RESUMED_LINE), ("step", STEP_LINE)):
                found = pattern.search(line)
                if found:
                    events.append((stamp[1], kind, int(found[1])))
                    break
    return sorted(events)
