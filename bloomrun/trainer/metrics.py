"""Throughput arithmetic and the trainer's Prometheus metrics (names: docs/metrics.md).

FLOPs per token (training: forward + backward), the formula the paper's throughput figures
and PaLM's MFU use:

    flops_per_token = 6 * N + 12 * L * d * T

N counts every parameter once, the tied embedding included: the embedding lookup costs
nothing but the tied output projection is a d x V matmul per token, so counting the matrix
once is exactly right. 6N is 2 FLOPs per multiply-add times 3 (forward, and a backward that
costs twice the forward). 12*L*d*T is attention's QK^T and AV matmuls (2 * 2 * T * d per
token and layer, forward, times 3), ignoring the causal mask's halving as PaLM does.
Activation recomputation is not counted: this is *model* FLOPs, so MFU stays comparable.
Check: the 1.3B ablation shape at 52.0k tokens/s gives 472 TFLOP/s, as issue 3 states.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import Callable, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily

# Dense peak FLOP/s of one device by name and precision (vendor datasheets; no sparsity).
# fp32 on a GPU means TF32 tensor cores, which torch uses for fp32 matmuls when allowed.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 494e12},
    "H100": {"bf16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "A10G": {"bf16": 125e12, "fp32": 62.5e12},
    "L4": {"bf16": 121e12, "fp32": 60e12},
}
PEAK_ENV = "BLOOMRUN_PEAK_TFLOPS"  # override, e.g. for a CPU or an unlisted card


class HasShape(Protocol):
    """A config Shape or the model's ModelArgs: both name these fields."""

    num_layers: int
    hidden_size: int
    seq_length: int


def flops_per_token(num_parameters: int, shape: HasShape) -> float:
    return 6.0 * num_parameters + 12.0 * shape.num_layers * shape.hidden_size * shape.seq_length


def peak_flops(device_name: str, precision: str) -> float:
    """Peak FLOP/s of one device, NaN where unknown (a CPU has no meaningful datasheet peak,
    so its MFU is reported as NaN unless BLOOMRUN_PEAK_TFLOPS names one)."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12
    for name, peaks in PEAK_FLOPS.items():
        if name in device_name.upper():
            return peaks["bf16" if precision == "bf16" else "fp32"]
    return math.nan


@dataclass(frozen=True)
class Throughput:
    tokens_per_second: float
    samples_per_second: float
    tflops_per_device: float
    mfu: float


def throughput(
    tokens: int, samples: int, seconds: float, num_devices: int, flops_token: float, peak: float
) -> Throughput:
    """Global rates over one step; model TFLOP/s and MFU are per device."""
    seconds = max(seconds, 1e-9)
    tokens_per_second = tokens / seconds
    per_device = tokens_per_second * flops_token / max(num_devices, 1)
    return Throughput(
        tokens_per_second=tokens_per_second,
        samples_per_second=samples / seconds,
        tflops_per_device=per_device / 1e12,
        mfu=per_device / peak if peak == peak and peak > 0 else math.nan,
    )


class RunTotalCounter:
    """A Prometheus counter fed with one of the run's running totals (tokens, skipped steps,
    rollbacks; restored from the checkpoint on resume). It counts what this process adds:
    0 at start, as Prometheus expects of a counter, so a restart reads as a counter reset
    and never as the run's whole history arriving in one scrape. A total that goes down (a
    rollback restores an older checkpoint's) starts a new baseline without counting."""

    def __init__(self, counter: Counter):
        self._counter = counter
        self._last: float | None = None

    def set(self, total: float) -> None:
        if self._last is not None and total > self._last:
            self._counter.inc(total - self._last)
        self._last = total


class TrainerMetrics:
    """The metrics of docs/metrics.md, one registry per process, labelled by run and node."""

    def __init__(self, namespace: str, run: str, node_rank: int):
        self.registry = CollectorRegistry()
        labels = {"namespace": namespace, "run": run, "node_rank": str(node_rank)}

        def gauge(name: str, doc: str) -> Gauge:
            g = Gauge(name, doc, list(labels), registry=self.registry)
            return g.labels(**labels)

        def counter(name: str, doc: str) -> RunTotalCounter:
            # prometheus_client appends `_total` to a counter's name on exposition.
            c = Counter(name.removesuffix("_total"), doc, list(labels), registry=self.registry)
            return RunTotalCounter(c.labels(**labels))

        self.step = gauge("bloomrun_train_step", "last completed optimiser step")
        self.target_steps = gauge("bloomrun_train_target_steps", "steps the run will take in all")
        self.tokens = counter("bloomrun_train_tokens_total", "tokens trained on by this process")
        self.tokens_per_second = gauge("bloomrun_train_tokens_per_second", "global tokens/s over the last step")
        self.samples_per_second = gauge("bloomrun_train_samples_per_second", "global sequences/s over the last step")
        self.tflops = gauge("bloomrun_train_model_tflops", "model TFLOP/s per device (6N + 12LdT per token)")
        self.mfu = gauge("bloomrun_train_mfu_ratio", "model FLOPs utilisation, 0..1")
        self.loss = gauge("bloomrun_train_loss", "training loss of the last step")
        self.learning_rate = gauge("bloomrun_train_learning_rate", "learning rate of the last step")
        self.grad_norm = gauge("bloomrun_train_grad_norm", "global gradient norm before clipping")
        self.skipped_steps = counter("bloomrun_train_skipped_steps_total", "steps this process skipped for a non-finite loss or gradient")
        self.rollbacks = counter("bloomrun_train_rollbacks_total", "rollbacks this process made to the last good checkpoint")
        self.restarts = gauge("bloomrun_train_restarts", "times this run has been (re)started from a checkpoint")
        self.checkpoint_step = gauge("bloomrun_checkpoint_last_step", "step of the newest complete checkpoint")
        self.checkpoint_time = gauge("bloomrun_checkpoint_last_timestamp_seconds", "unix time the newest checkpoint was published")
        self.checkpoint_seconds = gauge("bloomrun_checkpoint_save_seconds", "wall time of the last save")
        self.checkpoint_interval = gauge("bloomrun_checkpoint_interval_seconds", "configured save interval in seconds")
        self._gpu_memory: Gauge | None = None
        self._gpu_labels = labels

    def start_totals(self, tokens: int, skipped_steps: int, rollbacks: int) -> None:
        """The run's totals as this process starts (restored from a checkpoint, or 0): the
        counters count from here, so even a skip at the first step is counted."""
        self.tokens.set(tokens)
        self.skipped_steps.set(skipped_steps)
        self.rollbacks.set(rollbacks)

    def watch_ranks(self, compute_seconds: Callable[[], dict[int, float]]) -> None:
        """bloomrun_train_rank_compute_seconds for this node's ranks, read at each scrape from
        their heartbeats (heartbeat.py): the straggler alert compares them across the run."""
        self.registry.register(_RankCollector(self._gpu_labels, hostname(), compute_seconds))

    def gpu_memory(self) -> Gauge:
        # Created on first use so that a CPU run exposes no GPU series at all.
        if self._gpu_memory is None:
            g = Gauge("bloomrun_gpu_memory_bytes", "peak allocated GPU memory of local rank 0",
                      list(self._gpu_labels), registry=self.registry)
            self._gpu_memory = g.labels(**self._gpu_labels)
        return self._gpu_memory

    def serve(self, port: int, port_file: str | None = None) -> int:
        """Serve /metrics; port 0 picks a free one, written atomically to `port_file`."""
        server, _thread = start_http_server(port, registry=self.registry)
        chosen = server.server_port
        if port_file:
            write_port_file(port_file, chosen)
        return chosen


class _RankCollector:
    """Each local rank's compute time in its last step, before its gradient reduction (which
    waits for the slowest rank, so the total step time is the same everywhere)."""

    def __init__(self, labels: dict[str, str], host: str, compute_seconds: Callable[[], dict[int, float]]):
        self.labels, self.host, self.compute_seconds = labels, host, compute_seconds

    def collect(self):
        family = GaugeMetricFamily("bloomrun_train_rank_compute_seconds",
                                   "this rank's compute in its last step, before the gradient reduction",
                                   labels=[*self.labels, "rank", "host"])
        for rank, seconds in sorted(self.compute_seconds().items()):
            family.add_metric([*self.labels.values(), str(rank), self.host], seconds)
        yield family


def write_port_file(path: str, port: int) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)  # readers see the old port or the new one, never half a number


def hostname() -> str:
    return socket.gethostname()
