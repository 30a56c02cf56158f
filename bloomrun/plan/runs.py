"""What finished runs tell the planner: their loss against compute, and the throughput they
achieved. Reading a run folder is the only I/O here (`read_runs`); the rest is pure.

A run folder is what `bloomctl run` writes: `config.yaml` (the resolved trainer config, for
the model's shape), `checkpoints/step-N/metadata.json` (step, tokens, the last step's loss,
world size, restarts, publication time) and `checkpoints/history.jsonl` (step, tokens and loss
of every checkpoint published, kept when `keepLast` prunes it: those points join the
checkpoints' for the fit, never the throughput). Nothing else is recorded on disk: tokens/s and
TFLOP/s are only exported live as Prometheus metrics, and the device type is not recorded at
all. So the throughput comes from two checkpoints of one process life (the same `restarts`
count): tokens between them over the time between their publications, on `world_size`
workers, which includes the time spent saving. A run without two such checkpoints has no
throughput record, and the planner says so rather than guessing one.

A local study (`bloomctl study run`) keeps its arms as run folders under `<study>/arms/`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from bloomrun.plan.arithmetic import PLAIN_FLOPS_PER_PARAM_TOKEN, count_parameters
from bloomrun.plan.fit import Point
from bloomrun.trainer.checkpoint_layout import list_checkpoints, read_history, read_metadata
from bloomrun.trainer.config import ModelConfig

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
SEARCH_DEPTH = 2  # a study folder holds its run folders in arms/


@dataclass(frozen=True)
class CheckpointRecord:
    step: int
    tokens: int
    loss: float | None  # rank 0's loss at its last step before the save (None: non-finite, or not recorded)
    world_size: int | None
    restarts: int
    published_at: float | None


@dataclass(frozen=True)
class RunRecord:
    name: str
    path: Path
    params: int
    shape: str  # "layers x hidden, heads"
    checkpoints: tuple[CheckpointRecord, ...]  # by step


@dataclass(frozen=True)
class Throughput:
    run: str
    params: int
    tokens: int
    gpu_seconds: float  # worker-seconds the tokens took
    described: str  # where the figures come from, for the plan's note

    @property
    def tflops_per_worker(self) -> float:
        """Hardware FLOP/s per worker: 6 x params per token (bloomrun does not recompute)."""
        return PLAIN_FLOPS_PER_PARAM_TOKEN * self.params * self.tokens / self.gpu_seconds / 1e12


class RunsError(ValueError):
    """A folder that is not a run folder, or an unreadable one; the message names it."""


# ------------------------------------------------------------------------------ reading


def find_run_folders(folder: Path) -> list[Path]:
    """`folder` itself when it is a run folder, else the run folders below it, at most two
    levels down (a folder of runs; a study's folder, whose arms are in arms/)."""
    if (folder / CONFIG_FILE).is_file():
        return [folder]
    if not folder.is_dir():
        raise RunsError(f"runs: {folder}: no such folder")
    found, level = [], [folder]
    for _ in range(SEARCH_DEPTH):
        level = sorted(child for parent in level for child in parent.iterdir() if child.is_dir())
        found += [child for child in level if (child / CONFIG_FILE).is_file()]
        level = [child for child in level if not (child / CONFIG_FILE).is_file()]
    if not found:
        raise RunsError(f"runs: {folder}: neither a run folder (no {CONFIG_FILE}) nor a folder of run folders")
    return sorted(found)


def read_run(folder: Path) -> RunRecord:
    try:
        config = yaml.safe_load((folder / CONFIG_FILE).read_text())
        model = ModelConfig(**(config.get("model") or {}))
    except (OSError, yaml.YAMLError, AttributeError, ValueError) as err:
        raise RunsError(f"runs: {folder / CONFIG_FILE}: not a readable trainer config ({err})") from None
    records = []
    for step, path in sorted(list_checkpoints(folder / CHECKPOINTS)):
        meta = read_metadata(path)
        if meta is None:  # not published yet, or unreadable: not a record
            continue
        loss = meta.get("loss")
        records.append(CheckpointRecord(
            step=int(meta.get("step", step)), tokens=int(meta.get("tokens", 0)),
            loss=float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None,
            world_size=meta.get("world_size"), restarts=int(meta.get("restarts", 0)),
            published_at=meta.get("published_at")))
    recorded = {c.step for c in records}
    records += [pruned_record(p) for p in read_history(folder / CHECKPOINTS) if p["step"] not in recorded]
    records.sort(key=lambda c: c.step)
    shape = model.shape()
    return RunRecord(name=folder.name, path=folder, params=count_parameters(model),
                     shape=f"{shape.num_layers} x {shape.hidden_size}, {shape.num_heads} heads",
                     checkpoints=tuple(records))


def pruned_record(point: dict) -> CheckpointRecord:
    """A checkpoint keepLast deleted, from the trainer's history line (checkpoint_layout):
    no time or world size, so it never counts for throughput."""
    loss = point.get("loss")
    finite = isinstance(loss, (int, float)) and math.isfinite(loss)
    return CheckpointRecord(step=int(point["step"]), tokens=int(point.get("tokens") or 0),
                            loss=float(loss) if finite else None, world_size=None, restarts=0, published_at=None)


def read_runs(folders: list[Path]) -> list[RunRecord]:
    return [read_run(run) for folder in folders for run in find_run_folders(folder)]


# --------------------------------------------------------------------------------- pure


def loss_points(runs: list[RunRecord]) -> list[Point]:
    """(model FLOPs 6 N D, loss) at every checkpoint that recorded a loss."""
    return [Point(compute=PLAIN_FLOPS_PER_PARAM_TOKEN * run.params * c.tokens, loss=c.loss, run=run.name, step=c.step)
            for run in runs for c in run.checkpoints if c.loss is not None and c.tokens > 0]


def measured_throughput(run: RunRecord) -> Throughput | None:
    """Tokens/s over consecutive checkpoints of one process life and one world size, summed
    over the run; None when no such pair exists."""
    tokens, seconds, workers = 0, 0.0, None
    for before, after in zip(run.checkpoints, run.checkpoints[1:]):
        same_life = before.restarts == after.restarts and before.world_size == after.world_size
        timed = before.published_at is not None and after.published_at is not None
        if same_life and timed and after.world_size and after.published_at > before.published_at \
                and after.tokens > before.tokens:
            tokens += after.tokens - before.tokens
            seconds += after.published_at - before.published_at
            workers = after.world_size  # the same in every pair counted, checked below
    if not tokens:
        return None
    pairs_workers = {c.world_size for c in run.checkpoints if c.world_size}
    if len(pairs_workers) > 1:
        return None  # resized mid-run: one rate per world size would be needed; keep it honest
    return Throughput(run=run.name, params=run.params, tokens=tokens, gpu_seconds=seconds * workers,
                      described=f"{run.name} {tokens / seconds:,.0f} tokens/s on {workers} workers")


def status_throughput(document: dict, source: str) -> Throughput:
    """From a BloomRun with its status (`kubectl get br NAME -o yaml`): the tokens trained over
    the GPU-hours the operator accounted (status.gpuHours.used, nodes x GPUs x running time:
    restarts and waits included, so the cluster's real rate, as BLOOM's 1.08M GPU-hours against
    its 956k of pure training). RunsError naming what is missing."""
    if not isinstance(document, dict) or document.get("kind") != "BloomRun":
        raise RunsError(f"{source}: not a BloomRun object")
    status, spec = document.get("status") or {}, document.get("spec") or {}
    tokens = (status.get("progress") or {}).get("tokens")
    used = (status.get("gpuHours") or {}).get("used")
    if not (isinstance(tokens, int) and tokens > 0 and isinstance(used, (int, float)) and used > 0):
        raise RunsError(f"{source}: no throughput record (status.progress.tokens {tokens!r}, "
                        f"status.gpuHours.used {used!r})")
    try:
        params = count_parameters(ModelConfig(**(spec.get("model") or {})))
    except (TypeError, ValueError) as err:
        raise RunsError(f"{source}: spec.model: {err}") from None
    name = "/".join(str(part) for part in ((document.get("metadata") or {}).get("namespace"),
                                          (document.get("metadata") or {}).get("name")) if part)
    return Throughput(run=name or source, params=params, tokens=tokens, gpu_seconds=used * 3600,
                      described=f"{name or source} {tokens:,} tokens in {used:,.1f} GPU-hours (its status)")


def no_throughput_reason(run: RunRecord) -> str:
    sizes = {c.world_size for c in run.checkpoints if c.world_size}
    if len(sizes) > 1:
        return f"{run.path}: trained on {len(sizes)} world sizes ({sorted(sizes)}); no single rate per worker"
    return (f"{run.path}: no two checkpoints of one process life ({len(run.checkpoints)} checkpoint(s) on disk); "
            "bloomrun records tokens/s only as live metrics, so there is no throughput record")


def throughputs(paths: list[Path]) -> tuple[list[Throughput], list[str]]:
    """(the throughput records, why the other sources have none) of run folders (bloomctl run's,
    or folders of them) and BloomRun files with a status."""
    found, missing = [], []
    for path in paths:
        if path.is_file():
            try:
                document = yaml.safe_load(path.read_text())
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
                raise RunsError(f"{path}: not readable as YAML ({err})") from None
            # kubectl get br -o yaml: one object, or several in a List.
            is_list = isinstance(document, dict) and document.get("kind") == "List"
            documents = document.get("items") or [] if is_list else [document]
            for document in documents:
                try:
                    found.append(status_throughput(document, str(path)))
                except RunsError as err:
                    missing.append(str(err))
            continue
        for run in read_runs([path]):
            measured = measured_throughput(run)
            if measured is None:
                missing.append(no_throughput_reason(run))
            else:
                found.append(measured)
    return found, missing


def achieved_tflops(found: list[Throughput], missing: list[str], gpu: str) -> tuple[float, str]:
    """(TFLOP/s per GPU over the throughput records, weighted by worker-seconds; the note that
    says where it came from and which sources had no record). RunsError if there is none."""
    if not found:
        raise RunsError("no throughput record: " + "; ".join(missing))
    tflops = sum(m.tflops_per_worker * m.gpu_seconds for m in found) / sum(m.gpu_seconds for m in found)
    note = (f"achieved TFLOP/s per GPU: {tflops:.4g}, measured (6 x params x tokens / worker-seconds) from "
            f"{', '.join(m.described for m in found)}; the records do not name the device, so this holds if "
            f"they ran on {gpu}")
    if missing:
        note += f"; without a record: {'; '.join(missing)}"
    return tflops, note
