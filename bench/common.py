"""Timing and reporting shared by the bench/ scripts.

Every figure is the median of repeated CUDA-event timings after warm-up, and every claim
is a ratio against baselines run in the same process on the same card. Inputs that would
fit in the 50 MB L2 are rotated among several copies so the cache is not what is measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch


def time_ms(fn, warmup: int = 5, iters: int = 30) -> float:
    """Median milliseconds of `fn()` over `iters` runs, each timed with its own CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_ms(fn, calls_per_graph: int = 10, iters: int = 20) -> float | None:
    """Device time per call, host launch cost excluded: `fn` is captured `calls_per_graph`
    times into one CUDA graph and the replays are timed. None (with the reason printed) when
    `fn` cannot be captured. Comparing it with `time_ms` tells launch-bound from kernel-bound.
    """
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (autotuning, allocations) outside the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls_per_graph):
                fn()
        return time_ms(graph.replay, warmup=2, iters=iters) / calls_per_graph
    except Exception as error:
        print("CUDA graph capture failed:", repr(error)[:200], flush=True)
        return None


def peak_gb(fn) -> float:
    """Peak allocated GB while `fn()` runs, counting what was allocated before it (inputs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


class Rotating:
    """Cycles through `copies` prepared input sets, one per call."""

    def __init__(self, make, copies: int = 4):
        self.sets = [make() for _ in range(copies)]
        self.index = 0

    def next(self):
        self.index = (self.index + 1) % len(self.sets)
        return self.sets[self.index]


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args()


def report(name: str, results: dict, out: Path | None) -> None:
    """Prints the figures and writes {name, card, date, command, results} as JSON."""
    record = {
        "bench": name,
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "results": results,
    }
    print(json.dumps(record, indent=1), flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))


def best_config(kernel) -> str | None:
    """The config an autotuned Triton kernel settled on (for BENCHMARKS.md)."""
    config = getattr(kernel, "best_config", None)
    return str(config) if config is not None else None
