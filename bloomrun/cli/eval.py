"""`bloomctl eval PATH`: zero-shot evaluation of a checkpoint with lm-evaluation-harness.

PATH is a run folder (runs/<name>), its checkpoints/ folder (the newest complete checkpoint is
scored) or one step-N checkpoint. The model is bloomrun's own, loaded from the checkpoint
(every ablation arm, rotary included); the shape and tokenizer come from the run's config.yaml
or --config. The tasks are --tasks or --suite, else the run's `eval` section, else bloomrun's
own tasks made from the example corpora. Nothing is downloaded (docs/eval.md says how to
stage the paper's 27 tasks).

Writes lm-eval's full results JSON beside the checkpoint (checkpoints/step-N.eval.json) and
prints each task's accuracy, the mean and the random-baseline-normalised mean.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from bloomrun.cli.export import choose_checkpoint, find_tokenizer, load_config, locate
from bloomrun.cli.main import UserError
from bloomrun.trainer.checkpoint_layout import STEP_DIR

DEVICES = ("auto", "cpu", "cuda")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="zero-shot evaluation of a checkpoint with lm-evaluation-harness",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="run folder, checkpoints folder or one step-N checkpoint")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--tasks", nargs="+", metavar="TASK", help="lm-eval task names (space or comma separated)")
    choice.add_argument("--suite", help="a named task list: bigscience-27, the paper's 27 tasks")
    parser.add_argument("--limit", type=int, help="documents per task (default: all)")
    parser.add_argument("--batch-size", type=int, help="requests per forward pass (default: the config's, 16)")
    parser.add_argument("--task-data-dir", help="folder of staged task data (default: the config's eval.taskDataDir)")
    parser.add_argument("--config", help="BloomRun manifest or trainer config (default: the run's config.yaml)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: a GPU when there is one")
    parser.add_argument("-v", "--verbose", action="store_true", help="show lm-eval's own log")
    parser.add_argument("--summary-file", metavar="PATH",
                        help="also write a one-line JSON summary (step, tokens, means, the mean's standard "
                             "error, per-task accuracy and standard error; "
                             "at most 4 KiB), or the error, to PATH: the operator's evaluation Job passes "
                             "/dev/termination-log")
    parser.set_defaults(func=evaluate)


def eval_settings(args: argparse.Namespace, config):
    """The run's eval section with the command line's choices over it, checked as the
    manifest's is (unknown task names and bad values are refused, naming the option)."""
    from pydantic import ValidationError

    from bloomrun.trainer.config import BLOOMRUN_EVAL_TASKS, EvalConfig, format_validation_error

    base = config.eval.model_dump(exclude_none=True) if config.eval else {}
    if args.tasks or args.suite or not config.eval:
        base.pop("tasks", None), base.pop("suite", None)
        if args.suite:
            base["suite"] = args.suite
        else:
            tasks = [t for item in (args.tasks or []) for t in item.split(",") if t]
            base["tasks"] = tasks or list(BLOOMRUN_EVAL_TASKS)
    for option, field in (("limit", "limit"), ("batch_size", "batch_size"), ("task_data_dir", "task_data_dir")):
        if getattr(args, option) is not None:
            base[field] = getattr(args, option)
    try:
        return EvalConfig.model_validate(base)
    except ValidationError as err:
        raise UserError(format_validation_error(err, "eval")) from None


def pick_device(choice: str):
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here")
    return torch.device(choice)


def evaluate(args: argparse.Namespace) -> int:
    """Score the checkpoint; with --summary-file, report the outcome there as well."""
    from bloomrun.eval import message

    try:
        step, tokens, summary = score(args)
    except UserError as err:
        if args.summary_file:
            Path(args.summary_file).write_text(message.encode_error(str(err)))
        raise
    if args.summary_file:
        averaged = [s for s in summary.scores if s.random is not None]
        Path(args.summary_file).write_text(message.encode(
            step, tokens, summary.mean, summary.normalised_mean, {s.task: s.value for s in averaged},
            mean_stderr=summary.mean_stderr, stderrs={s.task: s.stderr for s in averaged if s.stderr is not None}))
    return 0


def score(args: argparse.Namespace):
    """(step, tokens, summary) of the chosen checkpoint, after printing and writing its results."""
    source = locate_scored(Path(args.path))
    config = load_config(Path(args.config) if args.config else source.config)
    settings = eval_settings(args, config)
    tokenizer = find_tokenizer(config)
    if tokenizer is None:
        raise UserError(f"data.tokenizer {config.data.tokenizer!r}: no such file (evaluation reads text)")
    step_dir, meta = choose_checkpoint(source)
    task_data_dir = Path(settings.task_data_dir) if settings.task_data_dir else None
    if task_data_dir is not None and not task_data_dir.is_dir():
        raise UserError(f"eval.taskDataDir {task_data_dir}: no such folder")
    if not args.verbose:  # lm-eval logs every truncated request and every task it builds
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        logging.getLogger("lm_eval").setLevel(logging.ERROR)

    from bloomrun.eval import runner

    runner.prepare_environment(task_data_dir)  # before lm_eval is imported
    from bloomrun.eval.adapter import BloomLM, load_model
    from bloomrun.trainer import checkpoint as ckpt

    device = pick_device(args.device)
    started = time.monotonic()
    try:
        model = load_model(step_dir, config.model, device)
        lm = BloomLM(model, tokenizer, batch_size=settings.batch_size)
        results, summary = runner.evaluate(lm, settings.task_names(), limit=settings.limit,
                                           task_data_dir=task_data_dir)
    except (ckpt.CheckpointError, runner.EvalError, ValueError) as err:
        raise UserError(str(err)) from None
    path = runner.write_results(step_dir, meta, results, summary)
    print(f"step {meta['step']} ({meta.get('tokens', 0):,} tokens) of {step_dir}, "
          f"{time.monotonic() - started:.1f} s on {device.type}")
    print(format_summary(summary))
    print(f"results: {path}")
    return meta["step"], meta.get("tokens"), summary


def locate_scored(path: Path):
    """export.locate, naming the evaluation Job's case: the step-N folder it was made for is
    gone, so it was removed after the operator found it due (by hand: the trainer's pruning
    keeps checkpoints whose evaluation is pending, docs/eval.md)."""
    if STEP_DIR.match(path.name) and not path.exists():
        raise UserError(f"{path}: no such checkpoint: it was removed before it could be scored (deleted, or pruned "
                        "by checkpoint.keepLast without the run's status saying its evaluation was pending)")
    return locate(path)


def format_summary(summary) -> str:
    """A table: task, metric, value, stderr, random baseline, normalised; then the means."""
    rows = [("task", "metric", "value", "stderr", "random", "normalised")]
    for s in summary.scores:
        rows.append((s.task, s.metric, f"{s.value:.4f}", "" if s.stderr is None else f"{s.stderr:.4f}",
                     "" if s.random is None else f"{s.random:.4f}",
                     "" if s.normalised is None else f"{s.normalised:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    count = sum(1 for s in summary.scores if s.random is not None)
    if summary.mean is not None:
        stderr = "" if summary.mean_stderr is None else f" ± {summary.mean_stderr:.4f}"
        lines.append(f"mean acc {summary.mean:.4f}{stderr}, random-baseline-normalised mean "
                     f"{summary.normalised_mean:.4f} ({count} tasks)")
    return "\n".join(lines)
