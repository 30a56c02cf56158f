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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from bloomrun.trainer import parallel
from bloomrun.trainer.checkpoint_layout import (  # noqa: F401 (re-exported for the trainer and tests)
    METADATA,
    list_checkpoints,
    read_metadata,
    step_dir_name,
)
from bloomrun.trainer.data.indexed import fsync_path

log = logging.getLogger("bloomrun.checkpoint")

FORMAT_VERSION = 1
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


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


def verify(path: Path) -> dict:
    """The metadata of a complete, intact checkpoint, or CheckpointError saying what is wrong."""
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
    listed = meta.get("files")
    if not isinstance(listed, dict) or set(listed) != set(TENSOR_FILES):
        # Exactly our three files: a name like ../../x or /etc/shadow would be joined onto
        # the folder and hashed, and an omitted one would be loaded unchecked.
        raise CheckpointError(f"{path}/{METADATA}: lists files {sorted(listed or [])}, expected {list(TENSOR_FILES)}")
    for name, expected in listed.items():
        file = path / name
        if file.is_symlink() or not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, metadata says {expected['bytes']}")
        if sha256_file(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch")
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


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, stale temp folders, and
    incomplete folders older than the newest complete one. Returns what it removed."""
    removed = []
    complete_seen = 0
    for _step, path in list_checkpoints(root):
        is_complete = (path / METADATA).is_file()
        if is_complete:
            complete_seen += 1
        if (is_complete and complete_seen > keep_last) or (not is_complete and complete_seen > 0):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for entry in root.glob(".tmp-step-*"):
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


# ----------------------------------------------------------------------------- I/O


def publish(
    root: Path,
    state: TrainState,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, torch.Tensor],
    rng: dict[str, torch.Tensor],
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint from full tensors (rank 0 only) and publish it atomically."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(state.step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    for name, tensors in zip(TENSOR_FILES, (model, optimizer, rng)):
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))
        fsync_path(tmp / name)
        files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
    meta = {"format": FORMAT_VERSION, **asdict(state), "published_at": time.time(), "files": files, **(extra or {})}
    with open(tmp / METADATA, "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)
    if final.exists():  # a re-save of the same step (rollback, then SIGTERM at that step)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    return final


def read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    """safetensors only: loading a checkpoint never unpickles anything."""
    try:
        return load_file(str(path / name))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path / name}: unreadable ({err})") from None


# ------------------------------------------------------ with the engine (every rank calls)


def save(root: Path, state: TrainState, engine, optimizer, world: parallel.World, keep_last: int,
         extra: dict | None = None) -> Path | None:
    """Every rank gathers the full state (a collective); rank 0 publishes it and prunes old
    checkpoints; all wait for it. Returns the published folder on rank 0, else None."""
    weights, moments = parallel.gather_full_state(engine, optimizer)
    path = None
    if world.rank == 0:
        rng = {"torch": torch.get_rng_state()}
        if world.is_cuda:
            rng["cuda"] = torch.cuda.get_rng_state(world.local_rank)
        path = publish(root, state, weights, moments, rng, extra)
        prune(root, keep_last)
    del weights, moments
    if world.world_size > 1:
        dist.barrier()
    return path


def choose(root: Path, world: parallel.World, device: torch.device) -> tuple[Path, dict] | None:
    """The checkpoint to load, the same on every rank: rank 0 verifies (checksums) and picks;
    the others take its choice, so every rank loads the same step even if a file changes
    underneath. None when there is no complete checkpoint."""
    choice = newest_complete(root) if world.rank == 0 else None
    step = torch.tensor([choice[1]["step"] if choice else -1], dtype=torch.int64, device=device)
    if world.world_size > 1:
        dist.broadcast(step, src=0)
    if int(step) < 0:
        return None
    path = root / step_dir_name(int(step))
    return path, (choice[1] if choice else json.loads((path / METADATA).read_text()))


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
    weights = read_tensors(path, "model.safetensors")
    if with_moments:
        moments, steps = read_tensors(path, "optimizer.safetensors"), int(meta["optimizer_steps"])
    else:
        moments = {f"{name}.{key}": torch.zeros_like(tensor) for name, tensor in weights.items()
                   for key in parallel.MOMENTS}
        steps = 0
    parallel.load_full_state(engine, optimizer, weights, moments, steps)


def load(path: Path, meta: dict, engine, optimizer, world: parallel.World) -> TrainState:
    """Weights, moments and AdamW's step count into the engine, partitioned as this world
    needs; rank 0's RNG state into every rank. Returns the checkpoint's TrainState."""
    weights = read_tensors(path, "model.safetensors")
    moments = read_tensors(path, "optimizer.safetensors")
    parallel.load_full_state(engine, optimizer, weights, moments, int(meta["optimizer_steps"]))
    rng = read_tensors(path, "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if world.is_cuda and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], world.local_rank)
    return TrainState.from_dict(meta)
