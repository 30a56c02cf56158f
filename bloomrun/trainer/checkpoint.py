"""Checkpoints: consolidated, world-size independent, published atomically, loaded without
unpickling.

Format (one directory per step, `step-00001200/`):
    model.safetensors      full fp32 weights, by parameter name
    optimizer.safetensors  full AdamW moments, `<name>.exp_avg` / `<name>.exp_avg_sq`
    rng.safetensors        rank 0's torch RNG states (uint8 tensors)
    metadata.json          step, consumed_samples, tokens, restarts, counters, and the
                           sha256 of every file above; written last: its presence is what
                           makes a checkpoint complete (torchtitan's rule)

Why consolidated rather than DeepSpeed's own or universal checkpoints: DeepSpeed's files are
per-rank pickles (its loader calls torch.load(weights_only=False)), and changing the world
size needs an offline ds_to_universal conversion. Gathering every parameter's full fp32 value
and moments (DeepSpeed's safe_get_full_* API, the same for ZeRO 1, 2 and 3) gives files that
any world size loads directly, with safetensors, which cannot execute code. The cost is that
rank 0 holds one full tensor at a time and writes 12 bytes per parameter alone; measured
figures are in docs/trainer.md.

Every rank takes part in saving and loading (gathering and partitioning are collectives);
`save`, `choose` and `load` at the end are that part, the rest is pure or rank 0's I/O.

Publishing: rank 0 writes into `.tmp-step-N-<pid>/`, fsyncs every file and the folder,
renames it to `step-N` (atomic on POSIX) and fsyncs the parent. A crash leaves a `.tmp-*`
folder, which is never read and is removed by the next save.

The sharded layout (`checkpoint.format: sharded`, tensor-parallel runs; metadata
`layout: sharded`) keeps this protocol and the tensors' names but has every rank write its
own pieces into the same temp folder (checkpoint_sharded.py, checkpoint_shards.py). Loading
reads either layout into either engine; checksums are verified before use, each rank
hashing its share of the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from bloomrun.trainer import checkpoint_sharded as sharded
from bloomrun.trainer import parallel
from bloomrun.trainer.checkpoint_layout import (  # noqa: F401 (re-exported for the trainer and tests)
    HISTORY,
    METADATA,
    list_checkpoints,
    publish_folder,
    read_history,
    read_metadata,
    step_dir_name,
)
from bloomrun.trainer.checkpoint_shards import INDEX, RNG, SHARD_FILE, FullTensors, ShardError, read_index
from bloomrun.trainer.data.indexed import fsync_path
from bloomrun.trainer.pipeline import PipelineEngine, stage_tensors

log = logging.getLogger("bloomrun.checkpoint")

FORMAT_VERSION = 1
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
CONSOLIDATED, SHARDED = "consolidated", "sharded"  # metadata's `layout` (absent: consolidated)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says which and why."""


@dataclass
class TrainState:
    """What a resumed run needs besides tensors. Data order derives from consumed_samples."""

    step: int = 0
    consumed_samples: int = 0
    tokens: int = 0
    restarts: int = 0
    optimizer_steps: int = 0  # AdamW's own step count (bias correction); skipped steps excluded
    skipped_steps: int = 0
    rollbacks: int = 0
    skipped_ranges: list[list[int]] = field(default_factory=list)  # [start, end) sample ranges

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainState":
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)



# ------------------------------------------------------------------------ pure parts


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def layout_of(meta: dict) -> str:
    return meta.get("layout", CONSOLIDATED)


def check_listing(path: Path, meta: dict) -> list[str]:
    """The files a checkpoint's metadata lists, if they are the ones its layout has: a name
    like ../../x or /etc/shadow would be joined onto the folder and hashed, and an omitted
    one would be loaded unchecked."""
    listed = meta.get("files")
    names = sorted(listed) if isinstance(listed, dict) else []
    if layout_of(meta) == CONSOLIDATED:
        if set(names) != set(TENSOR_FILES):
            raise CheckpointError(f"{path}/{METADATA}: lists files {names}, expected {list(TENSOR_FILES)}")
    elif layout_of(meta) == SHARDED:
        shards = [n for n in names if SHARD_FILE.match(n)]
        if not shards or set(names) != {INDEX, RNG, *shards}:
            raise CheckpointError(f"{path}/{METADATA}: lists files {names[:6]}, expected {INDEX}, {RNG} "
                                  "and shard-NNNNN.safetensors files")
    else:
        raise CheckpointError(f"{path}: layout {layout_of(meta)!r}, expected {CONSOLIDATED} or {SHARDED}")
    return names


def check_structure(path: Path) -> dict:
    """Everything but the checksums: metadata present and parseable, the files of its layout
    listed, each present with its size. Returns the metadata; CheckpointError otherwise."""
    meta_path = path / METADATA
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no {METADATA} (incomplete checkpoint)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}/{METADATA}: unreadable ({err})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    if path.is_symlink():
        raise CheckpointError(f"{path}: a symbolic link, not a checkpoint folder")
    for name in check_listing(path, meta):
        file, expected = path / name, meta["files"][name]
        if file.is_symlink() or not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, metadata says {expected['bytes']}")
    return meta


def check_checksums(path: Path, meta: dict, names: Iterable[str]) -> None:
    for name in names:
        if sha256_file(path / name) != meta["files"][name]["sha256"]:
            raise CheckpointError(f"{path / name}: checksum mismatch")


def check_index(path: Path, meta: dict) -> None:
    """A sharded checkpoint's index.json (checksummed already) describes whole tensors in
    its listed files."""
    if layout_of(meta) == SHARDED:
        try:
            read_index(path, meta["files"])
        except ShardError as err:
            raise CheckpointError(str(err)) from None


def verify(path: Path) -> dict:
    """The metadata of a complete, intact checkpoint, or CheckpointError saying what is wrong."""
    meta = check_structure(path)
    check_checksums(path, meta, sorted(meta["files"]))
    check_index(path, meta)
    return meta


def first_intact(candidates: Iterable[Path]) -> tuple[Path, dict] | None:
    """The first of `candidates` that verifies; each one skipped is logged with its reason."""
    for path in candidates:
        try:
            return path, verify(path)
        except CheckpointError as err:
            log.warning("skipping checkpoint: %s", err)
    return None


def newest_complete(root: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies."""
    return first_intact(path for _step, path in list_checkpoints(root))


def newest_below(path: Path) -> tuple[Path, dict]:
    """A warm start's source: `path` itself when it is a checkpoint, else the newest complete
    checkpoint (by publication time) in it or one folder further down, which covers a local
    run folder (NAME/checkpoints/step-N) and a cluster run's (NAME/UID/step-N)."""
    if (path / METADATA).is_file():
        return path, verify(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    folders = [path, *(f for f in sorted(path.iterdir()) if f.is_dir() and not f.is_symlink())]
    published = [c for folder in folders for _step, c in list_checkpoints(folder)]
    # Newest first by the metadata alone; only then checksums, until one verifies (each
    # verify reads a whole checkpoint: 16 GB at 1.3B).
    published.sort(key=lambda c: (read_metadata(c) or {}).get("published_at", 0), reverse=True)
    found = first_intact(published)
    if found is None:
        raise CheckpointError(f"{path}: holds no complete checkpoint")
    return found


def prune(root: Path, keep_last: int, held: Container[int] = frozenset()) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints and those whose step is
    `held` (their evaluation may still read them: progress.HeldSteps), stale temp folders,
    and incomplete folders older than the newest complete one. Returns what it removed."""
    removed, kept_for_eval = [], []
    complete_seen = 0
    for step, path in list_checkpoints(root):
        is_complete = (path / METADATA).is_file()
        if is_complete:
            complete_seen += 1
        if is_complete and complete_seen > keep_last and step in held:
            kept_for_eval.append(step)
        elif (is_complete and complete_seen > keep_last) or (not is_complete and complete_seen > 0):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for entry in root.glob(".tmp-step-*"):
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    if kept_for_eval:
        log.info("keeping %d checkpoint(s) beyond checkpoint.keepLast=%d for evaluation (pending, or not "
                 "decided yet): steps %s", len(kept_for_eval), keep_last, sorted(kept_for_eval))
    return removed


# ----------------------------------------------------------------------------- I/O


def write_consolidated(folder: Path, model: dict[str, torch.Tensor],
                       optimizer: dict[str, torch.Tensor]) -> dict[str, dict]:
    """model.safetensors and optimizer.safetensors from full tensors, fsynced; their checksums."""
    files = {}
    for name, tensors in zip(TENSOR_FILES, (model, optimizer)):
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / name))
        fsync_path(folder / name)
        files[name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
    return files


def write_rng(folder: Path, rng: dict[str, torch.Tensor]) -> dict:
    save_file(rng, str(folder / RNG))
    fsync_path(folder / RNG)
    return {"sha256": sha256_file(folder / RNG), "bytes": (folder / RNG).stat().st_size}


def metadata(state: TrainState, files: dict, layout: str, extra: dict | None) -> dict:
    """metadata.json's content; a consolidated checkpoint's has no `layout` (as before it existed)."""
    meta = {"format": FORMAT_VERSION, **asdict(state), "published_at": time.time(), "files": files, **(extra or {})}
    if layout != CONSOLIDATED:
        meta["layout"] = layout
    return meta


def fresh_folder(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def publish(
    root: Path,
    state: TrainState,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, torch.Tensor],
    rng: dict[str, torch.Tensor],
    extra: dict | None = None,
) -> Path:
    """Write a consolidated checkpoint from full tensors (one process) and publish it atomically."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(state.step)
    tmp = fresh_folder(root / f".tmp-{final.name}-{os.getpid()}")
    files = {**write_consolidated(tmp, model, optimizer), RNG: write_rng(tmp, rng)}
    return publish_folder(root, tmp, final, metadata(state, files, CONSOLIDATED, extra))


def read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    """`name` (model.safetensors, optimizer.safetensors, rng.safetensors) of a verified
    checkpoint of either layout, full tensors; safetensors only: loading a checkpoint never
    unpickles anything."""
    meta = read_metadata(path) or {}
    try:
        if layout_of(meta) == SHARDED and name in TENSOR_FILES[:2]:
            index = read_index(path, meta.get("files", {}))
            weights, moments = sharded.state_names(index)
            return dict(FullTensors(path, index, weights if name == TENSOR_FILES[0] else moments))
        return load_file(str(path / name))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path / name}: unreadable ({err})") from None


# ------------------------------------------------------ with the engine (every rank calls)


def save(root: Path, state: TrainState, engine, optimizer, world: parallel.World, keep_last: int,
         extra: dict | None = None, layout: str = CONSOLIDATED,
         held: Callable[[], Container[int]] | None = None) -> Path | None:
    """Every rank takes part (a collective): consolidated, all gather the full state and rank 0
    writes it; sharded, every rank writes its own pieces into the same temp folder. Rank 0
    then publishes and prunes old checkpoints, keeping the steps `held()` says evaluation
    still needs (asked after publishing: the freshest view); all wait for it. Returns the
    published folder on rank 0, else None."""
    final = root / step_dir_name(state.step)
    tmp = root / f".tmp-{final.name}-{_agreed_pid(world)}"
    files: dict[str, dict] = {}
    if world.rank == 0:
        fresh_folder(tmp)
    if layout == SHARDED:
        if world.world_size > 1:
            dist.barrier()  # the folder exists before any rank writes into it
        files = sharded.write_shards(tmp, engine, optimizer, world)
    else:
        weights, moments = parallel.gather_full_state(engine, optimizer)
        if world.rank == 0:
            files = write_consolidated(tmp, weights, moments)
        del weights, moments
    path = None
    if world.rank == 0:
        rng = {"torch": torch.get_rng_state()}
        if world.is_cuda:
            rng["cuda"] = torch.cuda.get_rng_state(world.local_rank)
        files[RNG] = write_rng(tmp, rng)
        path = publish_folder(root, tmp, final, metadata(state, files, layout, extra))
        prune(root, keep_last, held() if held is not None else frozenset())
    if world.world_size > 1:
        dist.barrier()
    return path


def _agreed_pid(world: parallel.World) -> int:
    """Rank 0's process id, on every rank: the temp folder's name they all write into."""
    device = torch.device("cuda", world.local_rank) if world.is_cuda else torch.device("cpu")
    pid = torch.tensor([os.getpid()], dtype=torch.int64, device=device)
    if world.world_size > 1:
        dist.broadcast(pid, src=0)
    return int(pid)


def choose(root: Path, world: parallel.World, device: torch.device) -> tuple[Path, dict] | None:
    """The checkpoint to load, the same on every rank: newest first, each candidate checked
    by every rank (structure, then the checksums of its share of the files; a sharded
    checkpoint's files are spread over the world, so no rank hashes them all) until one
    passes everywhere. Each one skipped is logged by rank 0 with the first reason found.
    None when there is no complete checkpoint."""
    steps = [step for step, _path in list_checkpoints(root)] if world.rank == 0 else []
    count = torch.tensor([len(steps)], dtype=torch.int64, device=device)
    if world.world_size > 1:
        dist.broadcast(count, src=0)
        if int(count) == 0:
            return None
        listed = torch.tensor(steps or [0] * int(count), dtype=torch.int64, device=device)
        dist.broadcast(listed, src=0)
        steps = listed.tolist()
    for step in steps:
        path = root / step_dir_name(step)
        meta, error = None, None
        try:
            meta = check_structure(path)
            check_checksums(path, meta, sorted(meta["files"])[world.rank::world.world_size])
            if world.rank == 0:
                check_index(path, meta)
        except CheckpointError as err:
            error = str(err)
        errors = [error]
        if world.world_size > 1:
            errors = [None] * world.world_size
            dist.all_gather_object(errors, error)
        first = next((e for e in errors if e), None)
        if first is None:
            return path, meta
        if world.rank == 0:
            log.warning("skipping checkpoint: %s", first)
    return None


def choose_warm_start(source: Path, world: parallel.World) -> tuple[Path, dict]:
    """Rank 0 picks the warm start's checkpoint (verifying its checksums), every rank takes
    that choice. CheckpointError on every rank when there is none."""
    choice: list = [None]
    if world.rank == 0:
        try:
            choice[0] = newest_below(source)
        except CheckpointError as err:
            choice[0] = str(err)
    if world.world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], str):
        raise CheckpointError(choice[0])
    path, meta = choice[0]
    return Path(path), meta


def load_weights(path: Path, meta: dict, engine, optimizer, with_moments: bool) -> None:
    """A warm start: the checkpoint's weights (and AdamW's moments and step count, if asked),
    nothing of its training state; without moments the optimiser starts from zeros."""
    if layout_of(meta) == SHARDED:
        sharded.load(path, meta, engine, optimizer, with_moments)
        return
    weights = read_tensors(path, "model.safetensors")
    if with_moments:
        moments, steps = read_tensors(path, "optimizer.safetensors"), int(meta["optimizer_steps"])
    else:
        moments = {f"{name}.{key}": torch.zeros_like(tensor) for name, tensor in weights.items()
                   for key in parallel.MOMENTS}
        steps = 0
    if isinstance(engine, PipelineEngine):  # a stage loads its own share of the whole model
        names = engine.stage_names()
        weights = stage_tensors(weights, names, engine.model_names)
        moments = stage_tensors(moments, names, engine.model_names)
    parallel.load_full_state(engine, optimizer, weights, moments, steps)


def load(path: Path, meta: dict, engine, optimizer, world: parallel.World) -> TrainState:
    """Weights, moments and AdamW's step count into the engine, partitioned as this world
    needs, from either layout; rank 0's RNG state into every rank. Returns the checkpoint's
    TrainState."""
    load_weights(path, meta, engine, optimizer, with_moments=True)
    rng = read_tensors(path, RNG)
    torch.set_rng_state(rng["torch"])
    if world.is_cuda and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], world.local_rank)
    return TrainState.from_dict(meta)
