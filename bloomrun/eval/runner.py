"""Run lm-eval on one checkpoint and summarise it the paper's way.

`prepare_environment` must run before lm_eval (and with it `datasets`) is first imported:
both read HF_HOME and the offline switches once, at import. Nothing is downloaded here:
HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 are set unless the caller set them, so a task
whose data is not staged fails at once with an error that names it (EvalError).

Summary (BigScience's): each task's accuracy (`acc`; `exact_match` where a task has no
`acc`, e.g. triviaqa), their mean, and the random-baseline-normalised mean, the average of
(acc - random) / (1 - random); the mean's standard error from lm-eval's per-task ones
(`mean_stderr`: the one formula, for a local study and the operator's status alike). `random` is computed from the task's own documents: the mean
of 1 / number of choices for multiple-choice tasks, 0 for the others (lambada, triviaqa). A
perplexity task (loglikelihood_rolling) has no accuracy: it is reported, not averaged.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HF_CACHE_DIR = "huggingface"  # taskDataDir/huggingface: a Hugging Face cache (HF_HOME)
ACCURACY_METRICS = ("acc", "exact_match")
RESULTS_SUFFIX = ".eval.json"


class EvalError(Exception):
    """An evaluation that cannot run: a task that does not exist or whose data is absent."""


def prepare_environment(task_data_dir: Path | None) -> None:
    """Offline switches, and HF_HOME at taskDataDir/huggingface when that cache exists."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if task_data_dir is not None and (task_data_dir / HF_CACHE_DIR).is_dir():
        os.environ.setdefault("HF_HOME", str(task_data_dir / HF_CACHE_DIR))


def load_tasks(names: list[str], task_data_dir: Path | None, builtin_dir: Path) -> tuple[dict, Any]:
    """lm-eval Task objects by name, each loaded on its own so that an error names its task,
    and the TaskManager that found them (for simple_evaluate, which otherwise builds a default
    one: lm-eval's whole index again, 40-60 s per call on the 2-core VM)."""
    from bloomrun.eval import tasks as builtin
    from lm_eval.tasks import TaskManager

    wanted_builtin = [n for n in names if n in builtin.TASKS]
    builtin.write_tasks(builtin_dir, wanted_builtin)
    include = [str(builtin_dir)]
    if task_data_dir is not None:
        if not task_data_dir.is_dir():
            raise EvalError(f"taskDataDir {task_data_dir}: no such folder")
        include.append(str(task_data_dir))
    # Indexing lm-eval's own task YAMLs takes ~40 s on the 2-core VM (4 s without), on every
    # call: skipped when bloomrun's own tasks are all that is asked for (bloomctl study run
    # scores every arm's checkpoints in one process).
    manager = TaskManager(include_path=include, include_defaults=any(n not in builtin.TASKS for n in names))
    loaded = {}
    for name in names:
        if name not in manager.all_tasks:
            raise EvalError(f"task {name}: neither a task of lm-eval {lm_eval_version()} nor one "
                            f"staged in taskDataDir ({task_data_dir or 'not set'})")
        try:
            loaded.update(manager.load(name)["tasks"])
        except Exception as err:  # datasets raises many types for data it cannot find offline
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise EvalError(f"task {name}: its data is not staged ({type(err).__name__}: {first}); "
                            f"see docs/eval.md") from None
    return loaded, manager


def random_baseline(task, limit: int | None) -> float:
    """Chance accuracy on the documents scored: mean 1/choices for multiple choice, else 0."""
    if task.OUTPUT_TYPE != "multiple_choice":
        return 0.0
    docs = list(task.eval_docs)[:limit] if limit else list(task.eval_docs)
    return sum(1 / len(task.doc_to_choice(doc)) for doc in docs) / max(1, len(docs))


@dataclass
class TaskScore:
    task: str
    metric: str  # acc or exact_match; for a perplexity task, word_perplexity
    value: float
    stderr: float | None
    random: float | None  # None: not an accuracy, not averaged
    num_samples: int

    @property
    def normalised(self) -> float | None:
        if self.random is None:
            return None
        return (self.value - self.random) / (1 - self.random)


@dataclass
class Summary:
    scores: list[TaskScore]
    mean: float | None  # mean accuracy over the tasks that have one
    normalised_mean: float | None

    @property
    def mean_stderr(self) -> float | None:
        """Standard error of `mean` (None when a task averaged has none)."""
        return mean_stderr([s.stderr for s in self.scores if s.random is not None])

    def to_dict(self) -> dict:
        return {"mean": self.mean, "normalisedMean": self.normalised_mean,
                "tasks": {s.task: {**asdict(s), "normalised": s.normalised} for s in self.scores}}


def mean_stderr(stderrs: list[float | None]) -> float | None:
    """Standard error of a mean over tasks scored independently: sqrt(sum of squares) / tasks;
    None if any task has none (a partial figure would understate the noise)."""
    if not stderrs or any(s is None for s in stderrs):
        return None
    return math.sqrt(sum(s * s for s in stderrs)) / len(stderrs)


def summarize(results: dict, baselines: dict[str, float]) -> Summary:
    """Per-task accuracy and the two means from lm-eval's results dict."""
    scores = []
    for task, values in results["results"].items():
        metric = next((m for m in ACCURACY_METRICS if f"{m},none" in values), None)
        num = results.get("n-samples", {}).get(task, {}).get("effective", values.get("sample_len", 0))
        if metric is None:
            metric = next((m for m in ("word_perplexity", "perplexity") if f"{m},none" in values), None)
            if metric is None:
                continue
            scores.append(TaskScore(task, metric, float(values[f"{metric},none"]), None, None, num))
            continue
        stderr = values.get(f"{metric}_stderr,none")
        scores.append(TaskScore(task, metric, float(values[f"{metric},none"]),
                                float(stderr) if isinstance(stderr, (int, float)) else None,
                                baselines.get(task, 0.0), num))
    accuracies = [s for s in scores if s.random is not None]
    mean = sum(s.value for s in accuracies) / len(accuracies) if accuracies else None
    normalised = sum(s.normalised for s in accuracies) / len(accuracies) if accuracies else None
    return Summary(scores, mean, normalised)


def lm_eval_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm_eval")


def bloomrun_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("bloomrun")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def evaluate(lm, names: list[str], *, limit: int | None = None, task_data_dir: Path | None = None,
             log_samples: bool = False) -> tuple[dict, Summary]:
    """lm-eval's results for `names` on `lm`, and their summary. EvalError for a task that is
    unknown or whose data is absent."""
    prepare_environment(task_data_dir)
    from lm_eval import simple_evaluate

    with tempfile.TemporaryDirectory(prefix="bloomrun-eval-tasks-") as builtin_dir:
        loaded, manager = load_tasks(names, task_data_dir, Path(builtin_dir))
        baselines = {name: random_baseline(task, limit) for name, task in loaded.items()}
        results = simple_evaluate(model=lm, tasks=list(loaded.values()), task_manager=manager, limit=limit,
                                  log_samples=log_samples, bootstrap_iters=1000)
    return results, summarize(results, baselines)


def results_path(step_dir: Path) -> Path:
    """Beside the checkpoint (checkpoints/step-N.eval.json), so it outlives the checkpoint's
    pruning (keepLast) and a run keeps its whole accuracy-against-tokens curve."""
    return step_dir.parent / f"{step_dir.name}{RESULTS_SUFFIX}"


def write_results(step_dir: Path, meta: dict, results: dict, summary: Summary) -> Path:
    """lm-eval's full results (less per-sample logs) plus what was scored, written atomically."""
    from lm_eval.utils import handle_non_serializable

    document = {key: value for key, value in results.items() if key != "samples"}
    document["bloomrun"] = {
        "version": bloomrun_version(), "lmEvalVersion": lm_eval_version(),
        "checkpoint": str(step_dir), "step": meta.get("step"), "tokens": meta.get("tokens"),
        "summary": summary.to_dict(),
    }
    path = results_path(step_dir)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=2, default=handle_non_serializable) + "\n")
    os.replace(tmp, path)
    return path
