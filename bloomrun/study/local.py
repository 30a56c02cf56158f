"""A BloomStudy on this machine: the arms one after another through `bloomctl run`'s own
launcher (bloomrun/cli/run.py: prepare, completed, supervise), each checkpoint the study's
eval selects scored by `bloomctl eval` (bloomrun/cli/eval.py), then the table.

The study folder (runs/<study>, or --output):

    study.yaml                     the study manifest as run (status and report read it)
    arms/<arm>/arm.yaml            the arm's BloomRun: base + patch, data paths made absolute
    arms/<arm>/config.yaml         bloomctl run's resolved config; checkpoints/ as bloomctl run
    arms/<arm>/checkpoints/step-N.eval.json   bloomctl eval's results, beside each checkpoint
    arms/<arm>/checkpoints/history.jsonl      the trainer's line per checkpoint published
                                   (step, tokens, loss), kept when keepLast prunes the checkpoint

Resumable as bloomctl run is: an arm whose newest checkpoint reached compareAtTokens is not
trained again, an interrupted one resumes from its newest checkpoint, and a checkpoint with
results beside it is not scored again.

The reading half (arm_status, study_statuses) is what `bloomctl study status` and the report
use; it reads only files and imports no torch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bloomrun.eval.runner import mean_stderr
from bloomrun.plan.arithmetic import count_parameters, gpu_hours, gpu_tflops
from bloomrun.study.spec import (
    ArmStatus,
    BloomStudy,
    arm_costs,
    arm_manifest,
    arm_run_name,
    arm_specs,
    compare,
    describe,
    load_study,
)
from bloomrun.trainer.checkpoint_layout import read_history, step_dir_name
from bloomrun.trainer.config import EvalConfig

STUDY_FILE = "study.yaml"
ARMS_DIR = "arms"
ARM_MANIFEST = "arm.yaml"
EVAL_SUFFIX = ".eval.json"  # bloomrun.eval.runner.RESULTS_SUFFIX, without importing lm-eval's side


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class StudyFolder:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / STUDY_FILE

    def arm(self, name: str) -> Path:
        return self.root / ARMS_DIR / name

    def checkpoints(self, name: str) -> Path:
        return self.arm(name) / "checkpoints"


def study_folder(name: str, output: str | os.PathLike | None, cwd: Path) -> StudyFolder:
    """runs/<study> under the current directory, or --output (bloomctl run's rule)."""
    from bloomrun.cli.launch import run_dir

    return StudyFolder(run_dir(name, output, cwd).absolute())


# ------------------------------------------------------------------ history and cadence


def steps_to_score(history: list[dict], eval_config: EvalConfig, compare_at_tokens: int) -> list[int]:
    """The checkpoints (steps) the study scores: eval.everyCheckpoints (every Nth), or
    eval.everyTokens (the first at or past each multiple of N tokens), else every one; and
    always the comparison point (the first checkpoint at or past compareAtTokens)."""
    chosen, last_multiple = [], 0
    for index, point in enumerate(history):
        tokens = point.get("tokens") or 0
        if eval_config.every_checkpoints is not None:
            due = (index + 1) % eval_config.every_checkpoints == 0
        elif eval_config.every_tokens is not None:
            due = tokens // eval_config.every_tokens > last_multiple
            last_multiple = max(last_multiple, tokens // eval_config.every_tokens)
        else:
            due = True
        if due or tokens >= compare_at_tokens:
            chosen.append(point["step"])
        if tokens >= compare_at_tokens:
            break
    return chosen


# --------------------------------------------------------------------------- reading


def eval_results_path(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"{step_dir_name(step)}{EVAL_SUFFIX}"


def read_eval(checkpoints: Path, step: int) -> dict | None:
    """bloomctl eval's summary of one checkpoint: {step, tokens, mean, normalisedMean, tasks}."""
    try:
        document = json.loads(eval_results_path(checkpoints, step).read_text())
        block = document["bloomrun"]
        return {"step": block["step"], "tokens": block["tokens"], **block["summary"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def comparison_point(history: list[dict], compare_at_tokens: int) -> dict | None:
    return next((p for p in history if (p.get("tokens") or 0) >= compare_at_tokens), None)


def arm_status(study: BloomStudy, folder: StudyFolder, name: str, estimate: float) -> ArmStatus:
    """One arm's row from its folder alone (checkpoints, history, results files)."""
    from bloomrun.trainer import runlock

    spec = study.spec
    checkpoints = folder.checkpoints(name)
    history = read_history(checkpoints)
    status = ArmStatus(name=name, run=arm_run_name(study.metadata.name, name), estimated_gpu_hours=estimate)
    newest = history[-1] if history else None
    at = comparison_point(history, spec.compare_at_tokens)
    if newest is not None:
        status.tokens = newest.get("tokens")
        model = arm_specs(spec)[name].model
        status.gpu_hours = gpu_hours(count_parameters(model), status.tokens or 1,
                                     gpu_tflops(spec.budget.gpu, spec.budget.achieved_tflops))
    scored = read_eval(checkpoints, at["step"]) if at else None
    if runlock.holder(checkpoints) is not None:
        status.phase = "Running"
    elif newest is None:
        status.phase = "Pending"
    elif at is None:
        status.phase = "Stopped"
    else:
        status.phase = "Succeeded" if scored else "Trained"
    if at is not None:
        status.loss = at.get("loss")
    if scored:
        tasks = scored.get("tasks", {})
        accuracies = {t: v for t, v in tasks.items() if v.get("random") is not None}
        status.eval_step, status.eval_tokens = scored["step"], scored["tokens"]
        status.mean, status.normalised_mean = scored.get("mean"), scored.get("normalisedMean")
        status.stderr = mean_stderr([v.get("stderr") for v in accuracies.values()])
        status.tasks = {t: v["value"] for t, v in accuracies.items()}
    return status


def study_statuses(study: BloomStudy, folder: StudyFolder) -> list[ArmStatus]:
    costs = arm_costs(study.spec)
    return [arm_status(study, folder, arm.name, costs[arm.name]) for arm in study.spec.arms]


def curves(study: BloomStudy, folder: StudyFolder, name: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(loss against tokens, mean accuracy against tokens) of one arm, from its folder."""
    checkpoints = folder.checkpoints(name)
    history = read_history(checkpoints)
    losses = [(p["tokens"], p["loss"]) for p in history if p.get("loss") is not None and p.get("tokens") is not None]
    accuracies = []
    for point in history:
        scored = read_eval(checkpoints, point["step"])
        if scored and scored.get("mean") is not None:
            accuracies.append((scored["tokens"], scored["mean"]))
    return losses, accuracies


def load_folder(path: Path) -> tuple[BloomStudy, StudyFolder]:
    """A study folder (holding study.yaml) or a study manifest (its folder: runs/<name>)."""
    if path.is_dir():
        folder = StudyFolder(path.absolute())
        if not folder.manifest.is_file():
            raise FileNotFoundError(f"{path}: not a study folder (no {STUDY_FILE}); run bloomctl study run first")
        return load_study(folder.manifest), folder
    study = load_study(path)
    return study, study_folder(study.metadata.name, None, Path.cwd())


# ---------------------------------------------------------------------------- running


def write_arm_manifest(study: BloomStudy, folder: StudyFolder, name: str, base_dir: Path) -> Path:
    """arms/<arm>/arm.yaml: the arm's BloomRun with paths made absolute (against the study
    manifest's folder, as bloomctl run resolves a manifest's), so it runs from any folder."""
    import yaml

    from bloomrun.trainer.resolve import resolve_data, resolve_path

    spec = arm_specs(study.spec)[name]
    update = {"data": resolve_data(spec.data, base_dir)}
    init_from = spec.checkpoint.init_from
    if init_from is not None and init_from.path is not None:
        update["checkpoint"] = spec.checkpoint.model_copy(update={
            "init_from": init_from.model_copy(update={"path": resolve_path(init_from.path, base_dir)})})
    path = folder.arm(name) / ARM_MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(arm_manifest(study, name, spec.model_copy(update=update)), sort_keys=False))
    return path


def command_line(*argv: str) -> argparse.Namespace:
    """bloomctl's own parsing of a command line: its defaults, whatever options it gains."""
    from bloomrun.cli.main import build_parser

    return build_parser().parse_args(argv)


def train_arm(manifest: Path, folder: StudyFolder, name: str, nproc: int, verbose: bool) -> int:
    """bloomctl run on the arm's manifest into its folder; its exit code."""
    from bloomrun.cli import run

    args = command_line("run", str(manifest), "--output", str(folder.arm(name)), "--nproc", str(nproc),
                        *(["--verbose"] if verbose else []))
    plan = run.prepare(args, env=os.environ, cwd=Path.cwd())
    done = run.completed(plan)
    if done is not None:
        print(f"{plan.name}: already complete {done}", flush=True)
        return 0
    return run.supervise(plan, verbose=verbose)


def score_arm(study: BloomStudy, folder: StudyFolder, name: str, verbose: bool) -> None:
    """bloomctl eval on each checkpoint the study's eval selects that has no results yet.
    A selected checkpoint keepLast already deleted is said, not an error."""
    from bloomrun.cli import eval as eval_cli

    checkpoints = folder.checkpoints(name)
    history = read_history(checkpoints)
    selected = [step for step in steps_to_score(history, study.spec.eval, study.spec.compare_at_tokens)
                if not eval_results_path(checkpoints, step).is_file()]
    gone = [step for step in selected if not (checkpoints / step_dir_name(step)).is_dir()]
    due = [step for step in selected if step not in gone]
    if gone:
        several = len(gone) > 1
        print(f"{name}: step{'s' * several} {', '.join(map(str, gone))} not scored: checkpoint.keepLast "
              f"deleted {'them' if several else 'it'} before the study could", flush=True)
    if due:
        print(f"{name}: scoring step{'s' * (len(due) > 1)} {', '.join(map(str, due))} with bloomctl eval "
              f"({', '.join(study.spec.eval.task_names())})", flush=True)
    for step in due:
        step_dir = checkpoints / step_dir_name(step)
        args = command_line("eval", str(step_dir), *(["--verbose"] if verbose else []))
        started = time.monotonic()
        # bloomctl eval's table per checkpoint would bury the study's lines: one line each
        # instead (the full results are in the file it writes), the table with --verbose.
        with contextlib.nullcontext() if verbose else quiet():
            eval_cli.evaluate(args)
        scored = read_eval(checkpoints, step) or {}
        print(f"{name}: step {step} ({scored.get('tokens', 0):,} tokens) scored: mean acc "
              f"{fmt(scored.get('mean'))}, normalised {fmt(scored.get('normalisedMean'))} "
              f"({time.monotonic() - started:.1f} s)", flush=True)


@contextlib.contextmanager
def quiet():
    """bloomctl eval without its table and lm-eval's progress bars (stderr; the adapter asks
    tqdm for them explicitly, so TQDM_DISABLE does not hide them): the study prints one line
    per checkpoint scored instead. Its errors still surface, as UserError."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_study(manifest: Path, output: str | None, nproc: int, verbose: bool) -> int:
    """Train and score every arm in order; the first arm that does not complete ends the
    study with its exit code (the same command resumes it)."""
    study = load_study(manifest)
    folder = study_folder(study.metadata.name, output, Path.cwd())
    folder.root.mkdir(parents=True, exist_ok=True)
    folder.manifest.write_text(manifest.read_text())
    arms = study.spec.arms
    print(f"study {study.metadata.name}: {len(arms)} arms to {study.spec.compare_at_tokens:,} tokens, "
          f"one after another, in {_shorter(folder.root)}/", flush=True)
    for index, arm in enumerate(arms, start=1):
        print(f"[{index}/{len(arms)}] {arm.name}: {describe_patch(arm.patch)}", flush=True)
        arm_file = write_arm_manifest(study, folder, arm.name, manifest.parent.absolute())
        code = train_arm(arm_file, folder, arm.name, nproc, verbose)
        if code != 0:
            print(f"study {study.metadata.name}: arm {arm.name} stopped (exit {code}); run the same command "
                  "again to resume", flush=True)
            return code
        score_arm(study, folder, arm.name, verbose)
    statuses = study_statuses(study, folder)
    print(format_table(study, statuses), flush=True)
    print(f"report: bloomctl study report {_shorter(folder.root)}", flush=True)
    return 0


def describe_patch(patch: dict, prefix: str = "") -> str:
    """{model: {position: rotary}} -> 'model.position=rotary'."""
    parts = []
    for key, value in patch.items():
        if isinstance(value, dict) and value:
            parts.append(describe_patch(value, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key}={json.dumps(value) if not isinstance(value, str) else value}")
    return ", ".join(parts) or "the base as it is"


def _shorter(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------ table


def table_rows(statuses: list[ArmStatus]) -> list[tuple[str, ...]]:
    rows = [("arm", "phase", "tokens", "GPU-h (est.)", "loss", "mean acc", "normalised", "± stderr")]
    for s in statuses:
        rows.append((s.name, s.phase, "-" if s.tokens is None else f"{s.tokens:,}",
                     "-" if s.gpu_hours is None else f"{s.gpu_hours:.3g}", fmt(s.loss), fmt(s.mean),
                     fmt(s.normalised_mean), fmt(s.stderr)))
    return rows


def format_table(study: BloomStudy, statuses: list[ArmStatus]) -> str:
    """The status table, then the comparison and what the numbers are."""
    rows = table_rows(statuses)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    spec = study.spec
    lines.append(f"loss and accuracy at the comparison point, {spec.compare_at_tokens:,} tokens; GPU-hours: "
                 f"8 x parameters x tokens trained at {gpu_tflops(spec.budget.gpu, spec.budget.achieved_tflops):g} "
                 f"TFLOP/s ({spec.budget.gpu}), the estimate on the cluster (a local run uses none)")
    lines.append(describe(compare(statuses)))
    return "\n".join(lines)
