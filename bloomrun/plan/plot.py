"""The plan's plot, as PNG and SVG: loss against compute with the fit and the candidates when
runs were given, else GPU-hours against parameters with the budget and the candidates.

`build_figure` is pure (a matplotlib Figure, no pyplot state); `write_plot` saves it. The
SVG keeps its text as text (svg.fonttype none) and each candidate's marker carries the id
`candidate-<layers>x<hidden>x<heads>`, so the file can be searched and checked.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from bloomrun.plan import arithmetic
from bloomrun.plan.planner import Candidate, Plan, si

FORMATS = ("png", "svg")


def build_figure(plan: Plan) -> Figure:
    figure = Figure(figsize=(9, 6), dpi=110)
    figure.subplots_adjust(left=0.09, right=0.97, bottom=0.09, top=0.94)
    axes = figure.add_subplot()
    if plan.fit is not None:
        _loss_vs_compute(axes, plan)
    else:
        _hours_vs_params(axes, plan)
    axes.grid(True, which="both", alpha=0.25)
    axes.legend(loc="best", fontsize=8)
    return figure


def write_plot(plan: Plan, folder: Path) -> list[Path]:
    """Save the plot as PNG and SVG in `folder`; returns the paths."""
    name = "loss-vs-compute" if plan.fit is not None else "gpu-hours-vs-params"
    figure = build_figure(plan)
    paths = []
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "bloomctl-plan"}):
        for fmt in FORMATS:
            path = folder / f"{name}.{fmt}"
            figure.savefig(path, format=fmt)
            paths.append(path)
    return paths


def _label_offset(index: int) -> tuple[int, int]:
    """Neighbouring candidates often sit almost on one point: stagger their labels, alternately
    above and below, with a leader line to the marker."""
    step = 14 * (1 + (index // 2) % 4)
    return (10, step if index % 2 == 0 else -step)


def _mark(axes, candidate: Candidate, x: float, y: float, chosen: bool, index: int, yerr=None) -> None:
    style = dict(marker="*", markersize=14, color="tab:red") if chosen else dict(marker="o", markersize=6,
                                                                                color="tab:blue")
    if yerr is None:
        (artist,) = axes.plot([x], [y], linestyle="none", **style)
    else:
        artist = axes.errorbar([x], [y], yerr=yerr, linestyle="none", capsize=3, **style).lines[0]  # the marker
    artist.set_gid(f"candidate-{candidate.label}")
    axes.annotate(candidate.label, (x, y), textcoords="offset points", xytext=_label_offset(index), fontsize=7,
                  fontweight="bold" if chosen else "normal",
                  arrowprops=dict(arrowstyle="-", color="0.5", linewidth=0.5))


def _loss_vs_compute(axes, plan: Plan) -> None:
    fit = plan.fit
    front = {(p.run, p.step) for p in fit.points}
    points = plan.runs_points
    axes.scatter([p.compute for p in points if (p.run, p.step) not in front],
                 [p.loss for p in points if (p.run, p.step) not in front], s=10, color="0.6", label="checkpoints")
    axes.scatter([p.compute for p in fit.points], [p.loss for p in fit.points], s=18, color="black",
                 label="compute frontier (fitted)")
    shown = [c for c in plan.shown() if c.prediction is not None]
    far = float(max([p.compute for p in fit.points] + [c.model_flops for c in shown]))
    xs = np.logspace(np.log10(min(p.compute for p in fit.points)), np.log10(far * 1.5), 200)
    predictions = [fit.predict(x) for x in xs]
    axes.plot(xs, [p.loss for p in predictions], color="tab:green", label=fit.describe().split(" (")[0])
    axes.fill_between(xs, [p.low for p in predictions], [p.high for p in predictions], color="tab:green", alpha=0.15,
                      label="95% prediction interval")
    for index, c in enumerate(shown):
        p = c.prediction
        _mark(axes, c, c.model_flops, p.loss, c is plan.chosen, index, yerr=[[p.loss - p.low], [p.high - p.loss]])
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlim(right=far * 20)  # room for the candidates' labels right of the last point
    axes.yaxis.set_major_formatter(ScalarFormatter())  # 4.0, not 4 x 10^0
    axes.yaxis.set_minor_formatter(ScalarFormatter())
    axes.set_xlabel("compute, model FLOPs (6 x params x tokens)")
    axes.set_ylabel("loss")
    axes.set_title(f"Loss against compute: the study's runs, the fit, the candidates for "
                   f"{plan.request.gpu_hours:,.0f} {plan.request.gpu} GPU-hours", fontsize=10)


def _hours_vs_params(axes, plan: Plan) -> None:
    request = plan.request
    shown = plan.shown()
    sizes = [c.params for c in shown] + [plan.compute_optimal.params]
    ns = np.logspace(np.log10(min(sizes) / 2), np.log10(max(sizes) * 2), 200)

    def hours(n, tokens):
        return arithmetic.gpu_hours(int(n), int(tokens), request.tflops, request.recompute)

    axes.axhline(request.gpu_hours, color="black", linestyle="--", label=f"budget {request.gpu_hours:,.0f} GPU-hours")
    axes.plot(ns, [hours(n, request.tokens_per_param * n) for n in ns], color="tab:green",
              label=f"compute-optimal tokens ({request.tokens_per_param:g} per parameter)")
    for tokens, what, color in ((request.min_tokens, "minimum", "tab:orange"),
                                (request.max_tokens, "data ceiling", "tab:purple")):
        if tokens:
            axes.plot(ns, [hours(n, tokens) for n in ns], color=color, label=f"{what}: {si(tokens)} tokens")
    axes.axvline(plan.compute_optimal.params, color="tab:green", linestyle=":",
                 label=f"compute-optimal size {si(plan.compute_optimal.params)}")
    for index, c in enumerate(c for c in shown if c.tokens):
        _mark(axes, c, c.params, c.gpu_hours, c is plan.chosen, index)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("parameters")
    axes.set_ylabel(f"GPU-hours at {request.tflops:g} TFLOP/s per GPU")
    axes.set_title(f"GPU-hours against size on {request.gpu}; candidates spend the budget", fontsize=10)
