"""How torchrun starts the trainer, for a worker pod and for `bloomctl run` alike: its
command line, the variables its workers need, and how long it waits for them on SIGTERM.

Pure builders (the operator's desired.py and the CLI's run.py call them and add only what
differs: where the rendezvous is, how many nodes, their own identity variables). The trainer
never imports Kubernetes, so the operator may import this module and the CLI may too.

The elastic settings come from what issue 2 measured with torch on 2 CPU cores and gloo:
with torchrun's defaults, killing one of two workers recovered in 6 of 11 tries (restarted
workers reused the rendezvous TCP store and read dead peers' addresses, pytorch#135712);
with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 it recovered 8 of 8 times in 3-4 s, and a short
last call plus a quick keep-alive cut a scale-down from 46 s to 7 s.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

TRAINER_MODULE = "bloomrun.trainer.train"
# Keys of torchrun's --rdzv-conf: decide quickly that a node is gone or that no more join.
RDZV_CONF = {"last_call_timeout": "2", "keep_alive_interval": "1", "keep_alive_max_attempt": "3"}
# Where local rank 0 writes the port its /metrics listens on; only a launcher that reads
# it sets it (bloomctl run). Never derived from checkpoint.dir: in a pod that put it at
# /metrics-port, which the non-root container cannot write.
METRICS_PORT_FILE_ENV = "BLOOMRUN_METRICS_PORT_FILE"

# ------------------------------------------------------------------------- shutdown
#
# On SIGTERM torchrun forwards it to its workers, waits --shutdown-timeout seconds (torch's
# default: 30) and then SIGKILLs them; the trainer finishes its step, saves a checkpoint and
# exits 0 in between. In a pod torchrun is the container's process, and the kubelet SIGKILLs
# everything once the pod's grace period is over. So torchrun waits for its workers as long
# as the grace period allows, less the time it needs to reap them and exit on its own
# before the kubelet's SIGKILL, and the grace period must leave at least the expected
# checkpoint time. `bloomctl run` uses the same number: nothing kills it sooner, and
# a second Ctrl-C kills the workers at once anyway.

GRACE_PERIOD_S = 300
"""The worker pods' terminationGracePeriodSeconds (the kubelet's default, 30, is too short)."""
SIGTERM_CHECKPOINT_S = 120
"""Finishing the step in flight and saving a checkpoint, at most: a 1.3B model's fp32 weights
and Adam moments are 12 bytes a parameter, about 16 GB, which shared storage at 0.5-1 GB/s
writes in tens of seconds (unmeasured on a cluster: this allows about 4x)."""
TORCHRUN_EXIT_S = 15
"""What torchrun needs after its workers exit: reaping them, closing the store, exiting."""


def shutdown_timeout(grace_period_s: int = GRACE_PERIOD_S, checkpoint_s: int = SIGTERM_CHECKPOINT_S) -> int:
    """torchrun's --shutdown-timeout in seconds under a grace period (the rule above)."""
    timeout = grace_period_s - TORCHRUN_EXIT_S
    if timeout < checkpoint_s:
        raise ValueError(f"a grace period of {grace_period_s} s leaves {timeout} s for the SIGTERM "
                         f"checkpoint, which may take {checkpoint_s} s")
    return timeout


# -------------------------------------------------------------------------- command


@dataclass(frozen=True)
class Rendezvous:
    """Where torchrun agents meet. A fresh `run_id` per run keeps runs apart (Kubeflow users
    saw separate jobs share rendezvous state with the default id)."""

    endpoint: str
    run_id: str
    nnodes: str = "1:1"
    """MIN:MAX agents (nodes)."""
    is_host: bool | None = None
    """Whether this agent hosts the rendezvous store (None: torch guesses from the address)."""


@dataclass(frozen=True)
class Launch:
    """One torchrun agent: what it starts, where it meets its peers, how it stops."""

    config_path: str
    """The resolved TrainerConfig the workers read (bloomrun.trainer.resolve)."""
    rendezvous: Rendezvous
    nproc: int
    """Workers on this node: one per GPU, or one CPU process."""
    max_restarts: int
    """Worker-group restarts torchrun may do before it exits non-zero (membership changes do not count)."""
    launcher: tuple[str, ...] = ("torchrun",)
    """The program: `torchrun` in the image, `python -m torch.distributed.run` for a venv."""
    log_dir: str | None = None
    """Where torchrun keeps the workers' logs (None: a temporary folder)."""
    shutdown_timeout_s: int = shutdown_timeout()


def rdzv_conf(rendezvous: Rendezvous) -> str:
    conf = dict(RDZV_CONF)
    if rendezvous.is_host is not None:
        conf["is_host"] = str(rendezvous.is_host).lower()
    return ",".join(f"{key}={value}" for key, value in conf.items())


def build_torchrun_command(launch: Launch) -> list[str]:
    """`torchrun ... -m bloomrun.trainer.train --config FILE`."""
    rdzv = launch.rendezvous
    command = [
        *launch.launcher,
        f"--nnodes={rdzv.nnodes}",
        f"--nproc-per-node={launch.nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rdzv.endpoint}",
        # Never the default id: jobs sharing an endpoint would share rendezvous state.
        f"--rdzv-id={rdzv.run_id}",
        f"--rdzv-conf={rdzv_conf(rdzv)}",
        f"--max-restarts={launch.max_restarts}",
        f"--shutdown-timeout={launch.shutdown_timeout_s}",
    ]
    if launch.log_dir is not None:
        command.append(f"--log-dir={launch.log_dir}")
    # The script's own arguments come after the module, where torchrun passes them on.
    return [*command, "-m", TRAINER_MODULE, "--config", str(launch.config_path)]


def build_env(metrics_port_file: str | None = None) -> dict[str, str]:
    """The variables every torchrun agent gets, in a pod and locally (its workers inherit them)."""
    env = {
        # Restarted agents must not reuse the rendezvous TCP store and read dead peers'
        # addresses (pytorch#135712): with this, recovery worked 8 of 8 times (see above).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "PYTHONUNBUFFERED": "1",  # worker log lines reach the console and `kubectl logs` as written
    }
    if metrics_port_file:
        env[METRICS_PORT_FILE_ENV] = metrics_port_file
    return env


# ------------------------------------------------------------------ local launches


REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir(env: Mapping[str, str]) -> Path:
    """Torch extensions, Triton kernels and torchrun logs of a checkout: $BLOOMRUN_CACHE, else
    <repo>/.cache, so JIT builds never go to the home folder (the image sets its own)."""
    return Path(env.get("BLOOMRUN_CACHE") or REPO_ROOT / ".cache")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct TCP ports free on `host` now (held open together, so they differ)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]

