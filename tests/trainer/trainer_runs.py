"""Launch real trainer processes for the trainer's tests: torchrun, CPU, gloo, a tiny model.

Every run of a test module shares one corpus and one config shape; the learning-rate decay
length is fixed (decayTokens) so that runs of different lengths follow the same schedule
and their steps can be compared number for number.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from bloomrun.trainer import elastic
from tests.cli.elastic_harness import Started, wait_until
from tests.trainer.data_helpers import write_corpus  # noqa: F401  the runs' corpus, for the suites that launch runs

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
GLOBAL_BATCH = 8
SEQ = 32
FP32_RTOL = 1e-5  # the parallel layouts against one rank: sums in another order (measured ~1e-7)
GRAD_NORM = re.compile(r"step (\d+)/\d+ \| loss \S+ \| grad_norm (\S+)")  # rank 0's step line


def config(corpus: Path, checkpoints: Path, *, steps: int = 6, zero: int = 1, every: int = 2,
           micro: int = 2, **training) -> dict:
    return {
        "model": {"preset": "tiny", "seqLength": SEQ, "numLayers": 2, "hiddenSize": 32, "numHeads": 4},
        "data": {"sources": [{"path": str(corpus)}]},
        "optim": {"lr": 3e-3, "warmupTokens": 512, "decayTokens": 20 * GLOBAL_BATCH * SEQ},
        "training": {"globalBatchSize": GLOBAL_BATCH, "microBatchSize": micro, "trainSteps": steps,
                     "zeroStage": zero, **training},
        "checkpoint": {"dir": str(checkpoints), "everySteps": every, "keepLast": 3},
        "metrics": {"port": 0},
    }


class Run:
    """One torchrun launch of the trainer in its own folder, built as pods and `bloomctl run`
    build theirs (bloomrun.trainer.elastic), its process handled by the suite's one launcher
    (tests.cli.elastic_harness.Started). Each rank traces its steps (faults.py)."""

    def __init__(self, folder: Path, cfg: dict, ranks: int = 2, env: dict | None = None):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.config_path = folder / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.trace_file = folder / "trace"
        self.log = folder / "log.txt"
        self.ranks = ranks
        self.env = {**os.environ, **elastic.build_env(str(folder / "metrics-port")), "OMP_NUM_THREADS": "1",
                    "BLOOMRUN_TRACE_FILE": str(self.trace_file), "BLOOMRUN_RUN_NAME": "test",
                    "PYTHONPATH": str(REPO), **(env or {})}
        self.process: Started | None = None

    def start(self) -> "Run":
        rendezvous = elastic.Rendezvous(f"127.0.0.1:{elastic.free_ports(1)[0]}", f"test-{uuid.uuid4().hex[:8]}",
                                        nnodes="1", is_host=True)
        command = elastic.build_torchrun_command(elastic.Launch(
            str(self.config_path), rendezvous, nproc=self.ranks, max_restarts=0, launcher=TORCHRUN,
            log_dir=str(self.folder / "torchrun-logs"),
        ))
        self.process = Started(command, self.log, self.env, cwd=REPO)
        return self

    def wait(self, timeout: float = 240) -> int:
        return self.process.wait(timeout)

    def run(self, timeout: float = 240) -> "Run":
        code = self.start().wait(timeout)
        assert code == 0, f"trainer exited {code}:\n{self.output()[-4000:]}"
        return self

    def kill(self) -> None:
        """SIGKILL torchrun and every worker (torchrun starts workers in their own sessions,
        so killing its process group alone would leave them running)."""
        self.process.kill_all()

    def terminate(self) -> None:
        """SIGTERM to torchrun, which forwards it to the workers (what Kubernetes does)."""
        self.process.signal(signal.SIGTERM)

    def output(self) -> str:
        return self.process.text()

    def trace(self, rank: int = 0) -> list[dict]:
        """The steps rank `rank` has traced so far."""
        path = Path(f"{self.trace_file}.rank{rank}")
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def global_steps(self) -> dict[int, dict]:
        """Step -> {loss, indices (union over ranks, sorted), applied}; the last record wins
        (a step number repeats after a rollback)."""
        per_rank = [self.trace(r) for r in range(self.ranks)]
        merged: dict[int, dict] = {}
        for records in zip(*per_rank):
            step = records[0]["step"]
            merged[step] = {
                "loss": records[0]["loss"],
                "indices": sorted(i for r in records for i in r["indices"]),
                "applied": all(r["applied"] for r in records),
            }
        return merged

    def wait_for(self, predicate, timeout: float = 180, what: str = "condition") -> None:
        """Until `predicate()`; fails at once, with the log, if the trainer exits first."""
        def reached() -> bool:
            if predicate():
                return True
            if self.process.proc.poll() is not None:
                raise AssertionError(f"trainer exited {self.process.proc.returncode} before {what}:\n"
                                     f"{self.output()[-4000:]}")
            return False

        try:
            wait_until(reached, timeout, what)
        except TimeoutError as err:
            raise AssertionError(f"{err}:\n{self.output()[-4000:]}") from None


def checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if (p / "metadata.json").exists())


def losses(run: Run) -> dict[int, float]:
    return {step: record["loss"] for step, record in run.global_steps().items()}


def logged_grad_norms(run: Run) -> dict[int, float]:
    """{step: gradient norm} as rank 0 logged it (3 decimals)."""
    return {int(step): float(norm) for step, norm in GRAD_NORM.findall(run.output())}


def assert_close(got: dict[int, float], expected: dict[int, float]) -> None:
    """Every step of `got` has `expected`'s loss within FP32_RTOL."""
    assert got and set(got) <= set(expected)
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=FP32_RTOL), step
