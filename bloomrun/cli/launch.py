"""What `bloomctl run` launches beyond what every torchrun agent gets (bloomrun.trainer.elastic):
the run folder, and the workers' caches, threads and metric labels. Pure; run.py does the I/O."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from bloomrun.trainer import elastic


def run_dir(name: str, output: str | os.PathLike | None, cwd: Path) -> Path:
    """runs/<name> under the current directory, or --output."""
    return (cwd / output) if output else cwd / "runs" / name


def build_worker_env(
    base: Mapping[str, str], *, cache: Path, nproc: int, num_cpus: int, run_name: str, metrics_port_file: Path
) -> dict[str, str]:
    """torchrun's environment, which its workers inherit: this process's, the elastic
    settings, and local defaults. Explicit user settings of the caches and threads win."""
    env = dict(base) | elastic.build_env(metrics_port_file=str(metrics_port_file))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))
    env.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    # One intra-op thread per core each: more threads than cores makes gloo ranks wait on
    # each other's oversubscribed cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, num_cpus // nproc)))
    # The metrics' labels only: BLOOMRUN_RUN_NAME/NAMESPACE would make rank 0 report progress
    # to a BloomRun's status (bloomrun.trainer.progress), which a local run does not have.
    env["BLOOMRUN_NAMESPACE"] = "local"
    env["BLOOMRUN_RUN"] = run_name
    return env
