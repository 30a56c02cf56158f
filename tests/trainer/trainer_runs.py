"""Launch real trainer processes for the trainer's tests: torchrun, CPU, gloo, a tiny model.

Every run of a test module shares one corpus and one config shape; the learning-rate decay
length is fixed (decayTokens) so that runs of different lengths follow the same schedule
and their steps can be compared number for number.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from tests.trainer.data_helpers import write_corpus  # noqa: F401  the runs' corpus, for the suites that launch runs

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
GLOBAL_BATCH = 8
SEQ = 32


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
    """One torchrun launch of `python -m bloomrun.trainer.train` in its own folder."""

    def __init__(self, folder: Path, cfg: dict, ranks: int = 2, env: dict | None = None):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.config_path = folder / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.trace = folder / "trace"
        self.log = folder / "log.txt"
        self.ranks = ranks
        self.env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1",
                    "BLOOMRUN_TRACE_FILE": str(self.trace), "BLOOMRUN_RUN_NAME": "test",
                    "BLOOMRUN_METRICS_PORT_FILE": str(folder / "metrics-port"),
                    "PYTHONPATH": str(REPO), **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Run":
        command = [*TORCHRUN, "--standalone", f"--nproc-per-node={self.ranks}", "--log-dir",
                   str(self.folder / "torchrun-logs"), "-m", "bloomrun.trainer.train", "--config",
                   str(self.config_path)]
        self._log_file = open(self.log, "ab")
        self.proc = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log_file.close()

    def run(self, timeout: float = 240) -> "Run":
        code = self.start().wait(timeout)
        assert code == 0, f"trainer exited {code}:\n{self.output()[-4000:]}"
        return self

    def kill(self) -> None:
        """SIGKILL torchrun and every worker (torchrun starts workers in their own sessions,
        so killing its process group alone would leave them running)."""
        import psutil

        parent = psutil.Process(self.proc.pid)
        for process in [*parent.children(recursive=True), parent]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.wait()

    def terminate(self) -> None:
        """SIGTERM to torchrun, which forwards it to the workers (what Kubernetes does)."""
        self.proc.send_signal(signal.SIGTERM)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def steps(self, rank: int = 0) -> list[dict]:
        path = Path(f"{self.trace}.rank{rank}")
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def global_steps(self) -> dict[int, dict]:
        """Step -> {loss, indices (union over ranks, sorted), applied}; the last record wins
        (a step number repeats after a rollback)."""
        per_rank = [self.steps(r) for r in range(self.ranks)]
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"trainer exited {self.proc.returncode} before {what}:\n{self.output()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-4000:]}")


def checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if (p / "metadata.json").exists())
