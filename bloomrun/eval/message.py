"""The evaluation Job's report to the operator: a compact summary in its termination message.

An evaluation pod (`bloomctl eval ... --summary-file /dev/termination-log`) ends by writing
one line of JSON there; the kubelet copies it into the pod's status, where the operator
reads it without any network path to the pod or a mount of the checkpoint volume. The
kubelet keeps at most 4096 bytes of it, so the summary is compact: step, tokens, the two
means and the mean's standard error unrounded (a study compares arms by them, and must reach
the verdict a local study reaches from the results file), then each task's accuracy and
standard error, rounded; lm-eval's full results stay beside the checkpoint
(checkpoints/step-N.eval.json). A failed evaluation writes {"error": "..."} instead.

Version 1 throughout: fields are only ever added, optional, and a decoder ignores those it
does not know, so an operator and an evaluation image of different releases read each
other (a summary from before meanStderr decodes with no standard error).

Standard library only: the operator's image imports this module without torch or lm-eval.
"""

from __future__ import annotations

import json
import math

MAX_BYTES = 4096  # the kubelet's limit on one container's termination message
VERSION = 1
DIGITS = 4
# (per-task stderr kept, digits of the per-task figures), tried in order until the line fits:
# the stderrs go before the accuracies are cut below 3 digits, the accuracies before a task.
FITS = ((True, DIGITS), (True, 3), (False, DIGITS), (False, 3), (False, 2))


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def _exact(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _dumps(document: dict) -> str:
    return json.dumps(document, separators=(",", ":"))


def _fits(text: str) -> bool:
    return len(text.encode()) <= MAX_BYTES


def encode(step: int, tokens: int | None, mean: float | None, normalised_mean: float | None,
           accuracies: dict[str, float], *, mean_stderr: float | None = None,
           stderrs: dict[str, float] | None = None) -> str:
    """One JSON line of at most MAX_BYTES: per-task stderrs and digits go first, then tasks
    (the means and the mean's stderr, which the comparison of arms uses, always fit)."""
    document = {"v": VERSION, "step": int(step), "tokens": tokens, "mean": _exact(mean),
                "normalisedMean": _exact(normalised_mean), "meanStderr": _exact(mean_stderr)}
    stderrs = {name: value for name, value in (stderrs or {}).items() if name in accuracies}
    for with_stderr, digits in FITS:
        document["tasks"] = {name: _round(value, digits) for name, value in sorted(accuracies.items())}
        document.pop("taskStderr", None)
        if with_stderr and stderrs:
            document["taskStderr"] = {name: _round(value, digits) for name, value in sorted(stderrs.items())}
        text = _dumps(document)
        if _fits(text):
            return text
    tasks = document["tasks"]
    while tasks:
        tasks.pop(next(reversed(tasks)))
        document["truncated"] = True
        text = _dumps(document)
        if _fits(text):
            return text
    return text


def encode_error(message: str) -> str:
    """A failed evaluation's report: its one-line error, cut to fit."""
    message = " ".join(message.split())
    while True:
        text = json.dumps({"v": VERSION, "error": message}, separators=(",", ":"))
        if len(text.encode()) <= MAX_BYTES:
            return text
        message = message[: len(message) * 3 // 4] + "..."


class Report:
    """A decoded termination message: a result (step, tokens, means, accuracies) or an error."""

    def __init__(self, *, step: int | None = None, tokens: int | None = None, mean: float | None = None,
                 normalised_mean: float | None = None, accuracies: dict[str, float] | None = None,
                 mean_stderr: float | None = None, stderrs: dict[str, float] | None = None,
                 error: str | None = None):
        self.step, self.tokens, self.mean, self.normalised_mean = step, tokens, mean, normalised_mean
        self.accuracies = accuracies or {}
        self.mean_stderr = mean_stderr  # None: the summary has none (an older image, or a task without)
        self.stderrs = stderrs or {}  # per task, for those that fitted
        self.error = error

    @property
    def ok(self) -> bool:
        return self.error is None


def _optional(value) -> float | None:
    return None if value is None else float(value)


def _floats(mapping) -> dict[str, float]:
    """A summary's name -> number map; an absent one (older summaries have no stderr) is empty."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise TypeError(f"expected an object, got {type(mapping).__name__}")
    return {str(k): float(v) for k, v in mapping.items() if v is not None}


def decode(text: str | None) -> Report:
    """The report in a termination message. Anything that is not a summary (a crash's log
    tail, through FallbackToLogsOnError, or nothing) is an error carrying that text."""
    text = (text or "").strip()
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if not isinstance(document, dict) or document.get("v") != VERSION:
        lines = [line for line in text.splitlines() if line.strip()]
        return Report(error=" | ".join(lines[-3:])[-1024:] or "the evaluation pod left no message")
    if "error" in document:
        return Report(error=str(document["error"])[:1024])
    try:
        step = int(document["step"])
        tokens = None if document.get("tokens") is None else int(document["tokens"])
        accuracies = _floats(document.get("tasks"))
        stderrs = {name: value for name, value in _floats(document.get("taskStderr")).items() if name in accuracies}
        return Report(step=step, tokens=tokens, accuracies=accuracies, stderrs=stderrs,
                      mean=_optional(document.get("mean")), normalised_mean=_optional(document.get("normalisedMean")),
                      mean_stderr=_optional(document.get("meanStderr")))
    except (KeyError, TypeError, ValueError) as err:
        return Report(error=f"malformed evaluation summary ({err}): {text[:200]}")
