"""`bloomctl plan --gpu-hours H --gpu TYPE`: the final model's size, shape and tokens for a
GPU-hour budget, with the arithmetic shown (the paper's last question; docs/plan.md).

Prints a table of candidate shapes that obey BLOOM's rules (parameters, tokens, GPU-hours,
days, a 3-D layout and its memory per GPU), the compute-optimal point, the data-constrained
choice, and the arithmetic of the chosen model; writes a plot (PNG and SVG) and a BloomRun
manifest for the chosen model into --output. With --runs (a study's run folders) it also
fits loss against compute and predicts each candidate's loss.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from bloomrun.cli.main import UserError

SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def count(text: str) -> int:
    """350B, 1.2T, 350e9 or 350_000_000_000."""
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 350B, 1.2T, 350e9)")
    value = float(match.group(1).replace("_", "")) * SUFFIXES.get(match.group(2), 1)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return int(value)


def shape(text: str) -> tuple[int, int, int]:
    """LAYERSxHIDDEN[xHEADS]; heads default to hidden / 128 (BLOOM's head width)."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*(?:x\s*(\d+))?\s*", text.lower())
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (LAYERSxHIDDEN or LAYERSxHIDDENxHEADS, e.g. 70x14336x112)")
    layers, hidden = int(match.group(1)), int(match.group(2))
    heads = int(match.group(3)) if match.group(3) else max(1, hidden // 128)
    if heads < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: heads must be at least 1")
    return layers, hidden, heads


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value
    return parse


def add_parser(subparsers) -> None:
    from bloomrun.plan.arithmetic import ACHIEVED_TFLOPS

    parser = subparsers.add_parser("plan", help="propose the final model's size and shape for a GPU-hour budget",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_argument_group("budget and hardware")
    budget.add_argument("--gpu-hours", type=positive(float), required=True, help="the GPU-hour budget")
    budget.add_argument("--gpu", required=True, type=str.lower, choices=sorted(ACHIEVED_TFLOPS),
                        help="GPU type (achieved TFLOP/s and memory from bloomrun's table)")
    rate = budget.add_mutually_exclusive_group()
    rate.add_argument("--tflops", type=positive(float), help="achieved TFLOP/s per GPU instead of the table's")
    rate.add_argument("--tflops-from", nargs="+", type=Path, metavar="RUN",
                      help="measure achieved TFLOP/s per GPU from finished runs: run folders (bloomctl run's "
                           "runs/NAME) or BloomRun files with status (kubectl get br NAME -o yaml)")
    budget.add_argument("--gpus", type=positive(int), default=384,
                        help="GPUs the run will use, for days and the layout (default 384, BLOOM's)")
    budget.add_argument("--gpus-per-node", type=positive(int), default=8, help="GPUs per node (default 8)")
    budget.add_argument("--no-recompute", action="store_true",
                        help="6 FLOPs per parameter per token instead of 8 (no activation recompute)")
    data = parser.add_argument_group("data")
    data.add_argument("--min-tokens", type=count, help="train on at least this many tokens (BLOOM: 350B)")
    data.add_argument("--max-tokens", type=count, help="data ceiling: at most this many tokens")
    data.add_argument("--tokens-per-param", type=positive(float), default=20.0,
                      help="compute-optimal tokens per parameter (default 20, Hoffmann et al. 2022)")
    shapes = parser.add_argument_group("shapes")
    shapes.add_argument("--base", type=Path, metavar="MANIFEST",
                        help="BloomRun manifest whose model knobs, vocabulary, sequence length, data and optimiser the "
                             "final model keeps (default: BLOOM-176B's)")
    shapes.add_argument("--shape", type=shape, action="append", default=[], metavar="LxH[xA]",
                        help="a shape to check and choose (repeatable), e.g. 70x14336x112")
    shapes.add_argument("--head-dim", type=positive(int), action="append", metavar="D",
                        help="head width(s) of the candidates (default 128)")
    shapes.add_argument("--hidden-multiple", type=positive(int), default=1024,
                        help="hidden sizes considered: multiples of this (default 1024; the rule is 128)")
    shapes.add_argument("--aspect", type=positive(float), nargs=2, default=[64.0, 256.0], metavar=("MIN", "MAX"),
                        help="hidden / layers range of the candidates (default 64 256)")
    shapes.add_argument("--size-band", type=float, default=0.25,
                        help="candidates from this fraction below to above the sizes named (default 0.25)")
    layout = parser.add_argument_group("layout")
    layout.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=1, help="ZeRO stage (default 1, BLOOM's)")
    layout.add_argument("--global-batch", type=positive(int), default=2048, help="sequences per step (default 2048)")
    layout.add_argument("--tp", type=positive(int), help="pin tensor parallelism")
    layout.add_argument("--pp", type=positive(int), help="pin pipeline parallelism")
    layout.add_argument("--micro-batch", type=positive(int), help="pin the micro-batch")
    out = parser.add_argument_group("output")
    out.add_argument("--runs", nargs="+", type=Path, metavar="DIR",
                     help="a study's run folders (or folders of them): fit loss against compute")
    out.add_argument("--name", default="bloom-final", help="metadata.name of the manifest (default bloom-final)")
    out.add_argument("--output", type=Path, help="folder for the manifest and plots (default runs/plans/NAME)")
    out.add_argument("--all", action="store_true", help="list every candidate, not one per width")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bloomrun.plan import manifest as plan_manifest
    from bloomrun.plan.plot import write_plot

    base, base_dict = load_base(args.base)
    tflops, note = achieved_tflops(args)
    points = study_points(args.runs) if args.runs else ()
    plan = make_plan(args, base, tflops, note, points)
    bad = [c for c in plan.asked if not c.valid]
    show(plan, args.all)
    if bad:
        raise UserError("; ".join(f"shape {c.label}: {problem}" for c in bad for problem in c.problems))
    if plan.chosen is None:
        raise UserError("no candidate shape obeys the rules and fits: widen --aspect or --size-band, "
                        "add --head-dim values, or change --gpus")
    try:
        document = plan_manifest.build_manifest(plan, args.name, base_dict)
    except ValueError as err:
        raise UserError(str(err)) from None
    out = args.output or Path("runs") / "plans" / args.name  # beside the runs, ignored by git
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / f"{args.name}.yaml"
    manifest_path.write_text(plan_manifest.manifest_yaml(plan, document, str(args.base) if args.base else None))
    plots = write_plot(plan, out)
    console = make_console()
    console.print(f"wrote {manifest_path} (check it: bloomctl validate {manifest_path})")
    for path in plots:
        console.print(f"wrote {path}")
    return 0


def load_base(path: Path | None):
    """(the base's model section, its raw dict) or (None, None)."""
    if path is None:
        return None, None
    import yaml

    from bloomrun.operator.spec import ManifestError, load_manifest

    try:
        manifest = load_manifest(path)
    except ManifestError as err:
        raise UserError(f"--base: {err}") from None
    return manifest.spec.model, yaml.safe_load(path.read_text())


def achieved_tflops(args) -> tuple[float, str]:
    """(TFLOP/s per GPU, where it came from)."""
    from bloomrun.plan import arithmetic, runs

    if not args.tflops_from:
        source = "given with --tflops" if args.tflops else "bloomrun's table (docs/plan.md says where each came from)"
        return arithmetic.gpu_tflops(args.gpu, args.tflops), f"achieved TFLOP/s per GPU: {source}"
    try:
        return runs.achieved_tflops(*runs.throughputs(args.tflops_from), args.gpu)
    except runs.RunsError as err:
        raise UserError(f"--tflops-from: {err}") from None


def study_points(folders: list[Path]):
    from bloomrun.plan import runs

    try:
        return tuple(runs.loss_points(runs.read_runs(folders)))
    except runs.RunsError as err:
        raise UserError(str(err)) from None


def make_plan(args, base, tflops: float, note: str, points):
    from bloomrun.plan import planner, rules

    try:
        request = planner.Request(
            gpu_hours=args.gpu_hours, gpu=args.gpu, tflops=tflops,
            cluster=rules.Cluster(num_gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                                  global_batch=args.global_batch, zero_stage=args.zero_stage),
            recompute=not args.no_recompute, min_tokens=args.min_tokens, max_tokens=args.max_tokens,
            tokens_per_param=args.tokens_per_param, head_dims=tuple(args.head_dim or planner.DEFAULT_HEAD_DIMS),
            hidden_multiple=args.hidden_multiple, aspect=tuple(args.aspect), size_band=args.size_band,
            shapes=tuple(args.shape), tp=args.tp, pp=args.pp, micro_batch=args.micro_batch,
            **({"model": base} if base is not None else {}))
        return planner.build_plan(request, points, note)
    except ValueError as err:
        raise UserError(str(err)) from None


# ----------------------------------------------------------------------------- display


def make_console():
    """A terminal's width less one column (a line that fills the last column makes terminals
    like tmux mark it wrapped); piped output at 140, not rich's 80, so a log keeps whole rows."""
    import shutil

    from rich.console import Console

    width = shutil.get_terminal_size().columns - 1 if sys.stdout.isatty() else 140
    return Console(highlight=False, width=width)


def show(plan, every: bool) -> None:
    from rich import box
    from rich.padding import Padding
    from rich.table import Table

    from bloomrun.plan.memory import GIB
    from bloomrun.plan.planner import si

    console = make_console()
    request = plan.request
    marks = {}
    short = {"compute-optimal": "opt", "data-constrained": "data", "largest-at-minimum": "max"}
    for target in plan.targets():
        if target.candidate is not None:
            marks.setdefault(target.candidate.label, []).append(short[target.kind])
    for asked in plan.asked:
        marks.setdefault(asked.label, []).append("asked")
    if plan.chosen is not None:
        marks.setdefault(plan.chosen.label, []).insert(0, "*")
    # The title above the table, not in it: rich would wrap it to the table's width.
    console.print(f"Candidates for {request.gpu_hours:,.0f} GPU-hours on {request.gpu} ({request.tflops:.4g} TFLOP/s, "
                  f"{request.cluster.num_gpus} GPUs, ZeRO {request.cluster.zero_stage})")
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False)
    # Every column but the marks keeps its width: 80 columns hold the table (tests/plan/test_cli.py).
    for name in ("", "LxHxA", "params", "tokens", "GPU-hours", "days", "3-D layout", "GiB"):
        table.add_column(name, justify="left" if name in ("", "3-D layout") else "right", no_wrap=bool(name),
                         min_width=0 if name else 5)
    if plan.fit is not None:
        table.add_column("loss (95%)", justify="right", no_wrap=True)
    rows = list(plan.candidates) if every else plan.shown()
    for c in rows + [c for c in plan.asked if c not in rows]:
        cells = [" ".join(marks.get(c.label, [])), c.label, si(c.params), si(c.tokens), f"{c.gpu_hours:,.0f}",
                 f"{c.days:,.1f}", str(c.layout) if c.layout else "none", f"{c.memory.total_gib:,.1f}" if c.memory else "-"]
        if plan.fit is not None:
            p = c.prediction
            cells.append(f"{p.loss:.4g} ({p.low:.4g}-{p.high:.4g})" if p else "-")
        table.add_row(*cells, style="bold" if c is plan.chosen else None)
    console.print(table)
    console.print(f"{len(plan.candidates)} candidate(s) obey BLOOM's rules and fit in memory; "
                  + ("all shown." if every else "one row per hidden size nearest each named size; --all lists all."))
    console.print("* chosen, opt compute-optimal, data data-constrained, max largest at --min-tokens, asked --shape. "
                  "LxHxA: layers x hidden x heads. GiB: memory per GPU in the 3-D layout (docs/plan.md says what "
                  "it counts).")
    if plan.chosen is not None and plan.chosen.layout is not None:
        today = plan.chosen.bloomrun_memory
        without_zero = " and a pipeline's replicas with whole weights and gradients in a step" if plan.chosen.layout.pp > 1 else ""
        console.print(f"bloomrun's trainer runs this layout without activation recompute{without_zero}: model "
                      f"states {today.states_bytes / GIB:,.1f} + activations {today.activations_bytes / GIB:,.1f} = "
                      f"{today.total_gib:,.1f} GiB per GPU of {today.capacity_gib:g}, which "
                      + ("fits." if today.fits else "does NOT fit."))
    console.print("Arithmetic:", style="bold")
    for line in plan.arithmetic:
        console.print(Padding(line, (0, 0, 0, 2), expand=False))
    for c in plan.asked:
        if not c.valid:
            console.print(f"shape {c.label} breaks BLOOM's rules:", style="bold")
            for problem in c.problems:
                console.print(Padding(f"- {problem}", (0, 0, 0, 2), expand=False))
    sys.stdout.flush()
