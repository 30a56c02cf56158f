"""The terminal display of `bloomctl run`: rank 0's Prometheus endpoint and its log lines
feed one live progress line; the workers' other output is sorted from the trainer's own.

Parsing, sorting lines and the ETA are pure (tested without a trainer); `ProgressDisplay`
draws the live line on a terminal and plain lines elsewhere (CI logs, pipes).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text


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


# ------------------------------------------------------------------- worker lines

# The trainer's log format (bloomrun/trainer/train.py): time, rank, level, logger, message.
TRAINER_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d (\d\d:\d\d:\d\d),\d{3} \[rank \d+\] (\w+) (bloomrun[\w.]*): (.*)$")
STEP_MESSAGE = re.compile(r"^step (\d+)/(\d+) \| loss (\S+) .*\| tokens/s (\S+)")
CHECKPOINT_MESSAGE = re.compile(r"^checkpoint step (\d+) saved ")


@dataclass(frozen=True)
class Line:
    """One line of the workers' output, sorted."""

    text: str
    trainer: bool
    """The trainer's own log line or refusal; the rest (DeepSpeed's op builds and warnings,
    torchrun's agent, tracebacks of a stop) is shown only with --verbose or after a failure."""
    short: str = ""
    """How a terminal shows it: time and message, the level only when it is not INFO."""
    snapshot: Snapshot | None = None
    """The progress a step line carries."""
    step: int | None = None
    """The step a step or checkpoint line names (between step lines, a SIGTERM's checkpoint)."""


def sort_line(text: str) -> Line:
    if text.startswith("error: "):  # train.py's one-line refusals
        return Line(text, True, text)
    found = TRAINER_LINE.match(text)
    if not found:
        return Line(text, False, text)
    clock, level, message = found[1], found[2], found[4]
    short = f"{clock} {message}" if level == "INFO" else f"{clock} {level} {message}"
    if step := STEP_MESSAGE.match(message):
        snapshot = Snapshot(step=int(step[1]), target_steps=int(step[2]), loss=_number(step[3]),
                            tokens_per_second=_number(step[4]))
        return Line(text, True, short, snapshot, snapshot.step)
    saved = CHECKPOINT_MESSAGE.match(message)
    return Line(text, True, short, step=int(saved[1]) if saved else None)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# -------------------------------------------------------------------------- display


class StatusLine:
    """The live line: title, bar, step, loss, tokens/s, ETA, cut to the terminal's width
    (a line the terminal wraps would break the redraw and leave copies of the bar)."""

    BAR_MAX = 40
    BAR_MIN = 10

    def __init__(self, title: str):
        self.title = title[:24]
        self.step: int | None = None
        self.total: int | None = None
        self.info = "starting workers"

    def text(self, width: int) -> Text:
        counts = "" if self.step is None else f"step {self.step}/{self.total or '?'}"
        fixed = len(self.title) + len(counts) + len(self.info) + 3
        bar_width = min(self.BAR_MAX, width - fixed)
        line = Text(self.title, style="bold")
        if self.step is not None and self.total and bar_width >= self.BAR_MIN:
            done = round(bar_width * min(self.step, self.total) / self.total)
            line.append(" ").append("━" * done, style="magenta").append("━" * (bar_width - done), style="grey23")
        for part in (counts, self.info):
            if part:
                line.append(" " + part)
        line.truncate(max(width, 1), overflow="ellipsis")
        return line

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # Room for the terminal's own echo of ^C: at the last column it would wrap the line.
        yield self.text(options.max_width - 3)


class ProgressDisplay:
    """On a terminal: the trainer's lines, shortened to fit, scroll above one live status
    line. Elsewhere: the trainer's lines as they are. Other worker output only when verbose."""

    def __init__(self, title: str, stream: TextIO = sys.stdout, verbose: bool = False):
        self.console = Console(file=stream, highlight=False, soft_wrap=False)
        self.interactive = self.console.is_terminal
        self.verbose = verbose
        self.rate = StepRate()
        self.stream = stream
        self.status = StatusLine(title)
        self.last: Snapshot | None = None
        self.hidden: deque[str] = deque(maxlen=80)
        self.cwd = os.getcwd().rstrip(os.sep) + os.sep  # shown relative on a terminal
        self.live = Live(self.status, console=self.console, refresh_per_second=4, transient=False,
                         redirect_stdout=False, redirect_stderr=False) if self.interactive else None

    def __enter__(self) -> "ProgressDisplay":
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.live.stop()

    def worker_line(self, text: str) -> None:
        """A line of torchrun's or a worker's output."""
        line = sort_line(text)
        if line.snapshot is not None:
            self.update(line.snapshot)  # the bar never lags the lines above it
        elif line.step is not None and line.step > (self.status.step or 0):
            self.status.step = line.step
        if line.trainer or self.verbose:
            self.log(line.short.replace(self.cwd, "") if self.interactive and line.trainer else text)
        else:
            self.hidden.append(text)

    def log(self, text: str) -> None:
        """A line above the status line: on a terminal cut to its width, never wrapped."""
        if self.interactive:
            self.console.print(Text(text), no_wrap=True, overflow="ellipsis", crop=True)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def finish(self, loss: float | None = None) -> None:
        """Training completed: the last scrape may predate the final steps; `loss` is the
        final one (from the last checkpoint), so the bar and the summary agree."""
        if self.status.total:
            self.status.step = self.status.total
        if self.last is not None:
            self.last = replace(self.last, step=self.status.step or self.last.step,
                                loss=self.last.loss if loss is None else loss)
            self.status.info = describe(self.last, 0.0)
        if self.live:
            self.live.refresh()

    def update(self, snapshot: Snapshot, now: float | None = None) -> None:
        self.rate.observe(time.monotonic() if now is None else now, snapshot.step)
        self.last = snapshot
        eta = self.rate.eta_seconds(snapshot.step, snapshot.target_steps)
        self.status.step, self.status.total = snapshot.step, snapshot.target_steps or self.status.total
        self.status.info = describe(snapshot, eta)
        if self.live:
            self.live.refresh()
