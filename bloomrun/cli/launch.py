"""What `bloomctl run` launches, built without side effects: the resolved trainer config,
torchrun's command line and the workers' environment. run.py does the I/O.

The elastic settings come from what issue 2 measured with torch on 2 CPU cores and gloo:
with torchrun's defaults, killing one of two workers recovered in 6 of 11 tries (restarted
workers reused the rendezvous TCP store and read dead peers' addresses, pytorch#135712);
with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 it recovered 8 of 8 times in 3-4 s, and a short
last call plus a quick keep-alive cut a scale-down from 46 s to 7 s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bloomrun.trainer.config import TrainerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]

# Keys of torchrun's --rdzv-conf: decide quickly that a node is gone or that no more join.
RDZV_CONF = {"last_call_timeout": "2", "keep_alive_interval": "1", "keep_alive_max_attempt": "3"}

# Seconds torchrun waits after forwarding SIGTERM before it SIGKILLs the workers: the
# trainer's checkpoint-on-SIGTERM must fit in it.
SHUTDOWN_TIMEOUT_S = 60


@dataclass(frozen=True)
class Rendezvous:
    """Where torchrun agents meet. A fresh `run_id` per launch keeps runs apart (Kubeflow
    users saw separate jobs share rendezvous state with the default id)."""

    endpoint: str
    run_id: str
    nnodes: str = "1:1"
    is_host: bool | None = None
    """Whether this agent hosts the rendezvous store (None: torch guesses from the address)."""


def cache_dir(env: Mapping[str, str]) -> Path:
    """Per-checkout cache for torch extensions and torchrun logs: $BLOOMRUN_CACHE or <repo>/.cache."""
    return Path(env.get("BLOOMRUN_CACHE") or REPO_ROOT / ".cache")


def run_dir(name: str, output: str | os.PathLike | None, cwd: Path) -> Path:
    """runs/<name> under the current directory, or --output."""
    return (cwd / output) if output else cwd / "runs" / name


def resolve_path(path: str, base: Path) -> str:
    """A manifest's relative path means relative to the manifest's folder."""
    return str(Path(path) if Path(path).is_absolute() else base / path)


def resolve_trainer_config(
    config: TrainerConfig,
    *,
    manifest_dir: Path,
    checkpoint_dir: Path,
    metrics_port: int,
    train_steps: int | None = None,
) -> TrainerConfig:
    """The config the workers read: absolute data paths, the local checkpoint folder and
    metrics port, and optionally a different run length. Re-validated as a whole."""
    raw = config.model_dump(by_alias=True, exclude_none=True)
    for source in raw["data"]["sources"]:
        source["path"] = resolve_path(source["path"], manifest_dir)
    if "tokenizer" in raw["data"]:
        raw["data"]["tokenizer"] = resolve_path(raw["data"]["tokenizer"], manifest_dir)
    raw["checkpoint"]["dir"] = str(checkpoint_dir)
    raw["metrics"]["port"] = metrics_port
    if train_steps is not None:
        raw["training"].pop("trainTokens", None)
        raw["training"]["trainSteps"] = train_steps
    return TrainerConfig.model_validate(raw)


def build_torchrun_command(
    config_path: Path,
    *,
    nproc: int,
    rendezvous: Rendezvous,
    max_restarts: int,
    log_dir: Path,
    python: str,
) -> list[str]:
    """`python -m torch.distributed.run ... -m bloomrun.trainer.train --config FILE`."""
    conf = dict(RDZV_CONF)
    if rendezvous.is_host is not None:
        conf["is_host"] = str(rendezvous.is_host).lower()
    return [
        python, "-m", "torch.distributed.run",
        f"--nnodes={rendezvous.nnodes}",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rendezvous.endpoint}",
        f"--rdzv-id={rendezvous.run_id}",
        "--rdzv-conf", ",".join(f"{key}={value}" for key, value in conf.items()),
        f"--max-restarts={max_restarts}",
        f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
        f"--log-dir={log_dir}",
        "-m", "bloomrun.trainer.train", "--config", str(config_path),
    ]  # fmt: skip


def build_worker_env(
    base: Mapping[str, str], *, cache: Path, nproc: int, num_cpus: int, run_name: str
) -> dict[str, str]:
    """torchrun's environment, which its workers inherit. Explicit user settings of the
    cache folders and thread count win."""
    env = dict(base)
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # see the module docstring
    env.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))
    env.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    # One intra-op thread per core each: more threads than cores makes gloo ranks wait on
    # each other's oversubscribed cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, num_cpus // nproc)))
    env["PYTHONUNBUFFERED"] = "1"  # worker log lines reach the console as they are written
    env["BLOOMRUN_NAMESPACE"] = "local"  # the metrics' `namespace` label for local runs
    env["BLOOMRUN_RUN"] = run_name
    return env
