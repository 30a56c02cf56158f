"""The progress display of `bloomctl run`, fed by scraping rank 0's Prometheus endpoint.

Parsing and the ETA are pure (tested without a trainer); `ProgressDisplay` draws a rich
progress bar on a terminal and plain lines elsewhere (CI logs, pipes).
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn


@dataclass(frozen=True)
class Snapshot:
    """What one scrape of the trainer's /metrics says (names from docs/metrics.md)."""

    step: int
    target_steps: int | None
    loss: float | None
    tokens_per_second: float | None


def parse_metrics(text: str) -> Snapshot | None:
    """The training progress in a Prometheus text exposition; None before the first step."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values.setdefault(sample.name, sample.value)
    if "bloomrun_train_step" not in values:
        return None

    def finite(name: str) -> float | None:
        value = values.get(name)
        return value if value is not None and math.isfinite(value) else None

    target = finite("bloomrun_train_target_steps")
    return Snapshot(
        step=int(values["bloomrun_train_step"]),
        target_steps=int(target) if target else None,
        loss=finite("bloomrun_train_loss"),
        tokens_per_second=finite("bloomrun_train_tokens_per_second"),
    )


class StepRate:
    """Steps per second over a sliding window of (time, step) observations. Measured here
    rather than taken from tokens/s so that a resumed run's ETA starts from its own pace,
    not from the jump from step 0 to the checkpoint's step."""

    def __init__(self, window_s: float = 30.0):
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def observe(self, now: float, step: int) -> None:
        if self.samples and step < self.samples[-1][1]:
            self.samples.clear()  # rolled back or restarted from an older checkpoint
        self.samples.append((now, step))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window_s:
            self.samples.popleft()

    def steps_per_second(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, s0), (t1, s1) = self.samples[0], self.samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def eta_seconds(self, step: int, target: int | None) -> float | None:
        rate = self.steps_per_second()
        return None if rate is None or target is None else max(0, target - step) / rate


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def describe(snapshot: Snapshot, eta: float | None) -> str:
    """The fields beside the bar: loss, tokens/s, ETA."""
    loss = "-" if snapshot.loss is None else f"{snapshot.loss:.4f}"
    tps = "-" if snapshot.tokens_per_second is None else f"{snapshot.tokens_per_second:,.0f}"
    return f"loss {loss}  tokens/s {tps}  ETA {format_duration(eta)}"


class ProgressDisplay:
    """Worker log lines scroll above a progress bar on a terminal; elsewhere only the log
    lines are printed (the trainer logs one line per step anyway)."""

    def __init__(self, title: str, stream: TextIO = sys.stdout):
        self.console = Console(file=stream, highlight=False, soft_wrap=True)
        self.interactive = self.console.is_terminal
        self.rate = StepRate()
        self.stream = stream
        self.bar: Progress | None = None
        self.task = None
        if self.interactive:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=False,
            )
            self.task = self.bar.add_task(title, total=None, info="starting workers")

    def __enter__(self) -> "ProgressDisplay":
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def log(self, line: str) -> None:
        if self.bar:
            self.console.print(line, markup=False)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def finish(self) -> None:
        """Training completed: the last scrape may predate the final steps."""
        if self.bar is not None:
            total = self.bar.tasks[0].total
            if total:
                self.bar.update(self.task, completed=total)

    def update(self, snapshot: Snapshot, now: float | None = None) -> None:
        self.rate.observe(time.monotonic() if now is None else now, snapshot.step)
        if self.bar is None:
            return
        eta = self.rate.eta_seconds(snapshot.step, snapshot.target_steps)
        self.bar.update(
            self.task,
            completed=snapshot.step,
            total=snapshot.target_steps,
            info=describe(snapshot, eta),
        )
