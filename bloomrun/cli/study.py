"""`bloomctl study run / status / report`: a BloomStudy (the paper's ablation study: arms of
one base run, trained to equal tokens under one GPU-hour budget, compared by loss and
zero-shot accuracy) on this machine. See docs/study.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from bloomrun.cli.main import UserError
from bloomrun.cli.run import positive_int


def add_parser(subparsers) -> None:
    study = subparsers.add_parser(
        "study", help="run an ablation study (BloomStudy) locally, show its table, write its report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = study.add_subparsers(dest="study_command", required=True, metavar="ACTION", title="actions")

    run = actions.add_parser(
        "run", help="train and score the arms one after another (the same command resumes)",
        description="Trains each arm with bloomctl run's launcher to spec.compareAtTokens, scores the "
                    "checkpoints spec.eval selects with bloomctl eval, then prints the table. An arm "
                    "already complete is not trained again, an interrupted one resumes, a scored "
                    "checkpoint is not scored again.")
    run.add_argument("manifest", type=Path, help="BloomStudy manifest, e.g. examples/study-position.yaml")
    run.add_argument("--output", help="study folder (default runs/<metadata.name>)")
    run.add_argument("--nproc", type=positive_int, default=2, help="worker processes per arm (default 2)")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="show torchrun's, DeepSpeed's and each evaluation's full output")
    run.set_defaults(func=run_study)

    status = actions.add_parser(
        "status", help="the table: per arm phase, tokens, GPU-hours, loss and accuracy at the comparison point",
        description="Reads the study folder only (checkpoints, their results files, the arms' histories).")
    status.add_argument("path", type=Path, help="study folder (runs/<study>) or the study's manifest")
    status.set_defaults(func=show_status)

    report = actions.add_parser(
        "report", help="write report.md, report.html and the loss and accuracy plots (PNG and SVG)",
        description="A self-contained folder: the paper's table (arms x tasks, mean, normalised mean, "
                    "GPU-hours, loss at equal tokens), the best arm and whether its lead exceeds the "
                    "evaluation's standard error, and loss and mean accuracy against tokens per arm.")
    report.add_argument("path", help="study folder, or a study's name (runs/<name>)")
    report.add_argument("--output", type=Path, help="report folder (default <study folder>/report)")
    report.set_defaults(func=write_report)


def run_study(args: argparse.Namespace) -> int:
    from bloomrun.study import local
    from bloomrun.study.spec import StudyError

    if not args.manifest.is_file():
        raise UserError(f"{args.manifest}: no such manifest file")
    try:
        return local.run_study(args.manifest, args.output, args.nproc, args.verbose)
    except StudyError as err:
        raise UserError(str(err)) from None


def _load(path: Path):
    from bloomrun.study import local
    from bloomrun.study.spec import StudyError

    try:
        return local.load_folder(path)
    except (StudyError, FileNotFoundError) as err:
        raise UserError(str(err)) from None


def show_status(args: argparse.Namespace) -> int:
    from bloomrun.study import local

    if not args.path.exists():
        raise UserError(f"{args.path}: no such study folder or manifest")
    study, folder = _load(args.path)
    print(f"study {study.metadata.name}: {folder.root}")
    print(local.format_table(study, local.study_statuses(study, folder)))
    return 0


def write_report(args: argparse.Namespace) -> int:
    from bloomrun.study import report

    path = Path(args.path)
    if not path.exists() and "/" not in args.path:
        path = Path("runs") / args.path  # a study's name
    if not path.is_dir():
        raise UserError(f"{args.path}: no such study folder (nor runs/{args.path})")
    study, folder = _load(path)
    out = report.write(study, folder, args.output or folder.root / "report")
    print(f"report: {out}/report.md, report.html, loss.png/.svg, accuracy.png/.svg")
    return 0
