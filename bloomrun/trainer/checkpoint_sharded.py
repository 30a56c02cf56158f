"""Sharded checkpoints with the engine: every rank writes and reads only its own pieces, with
torch.distributed.checkpoint planning which (checkpoint_shards.py has the files and why).

`write_shards` is the tensor part of checkpoint.save for `layout: sharded` (checkpoint.py
keeps the protocol: temp folder, metadata written last, atomic rename); `load` is the tensor
part of checkpoint.load. No rank ever holds more than its own shard, plus, in `load` for a
DeepSpeed engine (tensor 1, which DCP cannot describe), one full tensor at a time.

`consolidate` turns a sharded checkpoint into a consolidated one, offline, one tensor at a
time: `python -m bloomrun.trainer.checkpoint_sharded SRC_STEP_DIR DEST_FOLDER`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from bloomrun.trainer import parallel
from bloomrun.trainer.checkpoint_layout import METADATA, publish_folder, step_dir_name
from bloomrun.trainer.checkpoint_shards import (
    RNG,
    FullTensors,
    ShardError,
    ShardReader,
    ShardWriter,
    checkpointable,
    read_index,
    write_safetensors,
)

MOMENTS = parallel.MOMENTS


def state_names(index: dict) -> tuple[list[str], list[str]]:
    """(weight names, moment names) of a sharded checkpoint's index."""
    names = sorted(index["tensors"])
    moments = [n for n in names if n.rsplit(".", 1)[-1] in MOMENTS]
    return [n for n in names if n not in set(moments)], moments


def is_mesh(engine) -> bool:
    """Whether the engine's parameters are DTensors (mesh_engine), which DCP reads into."""
    return any(isinstance(p, DTensor) for p in engine.module.parameters())


def holds_own_pieces(engine) -> bool:
    """Whether DCP can save and load the engine's tensors where they are: DTensors, or a
    pipeline stage's own parameters (pipeline.py: whole with one replica, FSDP2's DTensor
    shards with several; the tied weight, held by the first and the last stage, and whole
    replicas are written once, by DCP's dedup)."""
    from bloomrun.trainer.pipeline import PipelineEngine

    return is_mesh(engine) or isinstance(engine, PipelineEngine)


def sharded_state(engine, optimizer, with_moments: bool = True) -> dict[str, torch.Tensor]:
    """{checkpoint name: this rank's local tensor, marked with its pieces}; the names are the
    consolidated format's (checkpoint.py), so either layout loads into either engine."""
    state = {}
    for name, param in engine.module.named_parameters():
        state[name] = checkpointable(param)
        for key in MOMENTS if with_moments else ():
            state[f"{name}.{key}"] = checkpointable(optimizer.state[param][key])
    return state


def write_shards(folder: Path, engine, optimizer, world: parallel.World) -> dict[str, dict]:
    """Every rank writes its pieces into `folder` (a collective). On the coordinator (rank 0)
    returns {file: {sha256, bytes}} of every shard and of index.json; {} elsewhere."""
    import torch.distributed.checkpoint as dcp

    if not holds_own_pieces(engine):
        raise ShardError("sharded checkpoints need the tensor-parallel or pipeline engine "
                         "(parallel.tensor or parallel.pipeline > 1)")
    writer = ShardWriter(folder, world.rank)
    dcp.save(sharded_state(engine, optimizer), storage_writer=writer)
    return writer.files


def check_fits(index: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """The checkpoint holds every tensor the engine needs, in its shape; ValueError naming them."""
    tensors = index["tensors"]
    missing = sorted(set(shapes) - set(tensors))
    other = sorted(n for n in set(shapes) & set(tensors) if tuple(tensors[n]["shape"]) != shapes[n])
    if missing or other:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, other shape {other[:5]}")


def load(path: Path, meta: dict, engine, optimizer, with_moments: bool = True) -> None:
    """Weights (and AdamW's moments and step count, or zeros and step 0) from a verified
    sharded checkpoint into the engine, in this world's layout (a collective)."""
    index = read_index(path, meta["files"])
    steps = int(meta["optimizer_steps"]) if with_moments else 0
    if not holds_own_pieces(engine):  # DeepSpeed: full tensors one at a time, partitioned by DeepSpeed
        weights, moments = state_names(index)
        parallel.load_full_state(engine, optimizer, FullTensors(path, index, weights),
                                 FullTensors(path, index, moments), steps)
        if not with_moments:
            _zero_moments(optimizer)
        return
    import torch.distributed.checkpoint as dcp

    state = sharded_state(engine, optimizer, with_moments)
    check_fits(index, {name: tuple(t.global_shape) for name, t in state.items()})
    dcp.load(state, storage_reader=ShardReader(path, index))
    if not with_moments:
        _zero_moments(optimizer)
    parallel.set_optimizer_steps(engine, optimizer, steps)


@torch.no_grad()
def _zero_moments(optimizer) -> None:
    for state in optimizer.state.values():
        for key in MOMENTS:
            if key in state:
                state[key].zero_()


# ------------------------------------------------------------------ offline export


def consolidate(source: Path, dest_root: Path) -> Path:
    """A verified sharded checkpoint as a consolidated one in `dest_root/step-N`, written one
    full tensor at a time and published like any checkpoint (metadata last, atomic rename)."""
    from bloomrun.trainer import checkpoint as ckpt

    meta = ckpt.verify(source)
    if meta.get("layout") != "sharded":
        raise ckpt.CheckpointError(f"{source}: already consolidated")
    index = read_index(source, meta["files"])
    weights, moments = state_names(index)
    dest_root.mkdir(parents=True, exist_ok=True)
    final = dest_root / step_dir_name(int(meta["step"]))
    tmp = dest_root / f".tmp-{final.name}-consolidate"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    for name, names in (("model.safetensors", weights), ("optimizer.safetensors", moments)):
        files[name] = write_safetensors(tmp / name, FullTensors(source, index, names).entries())
    shutil.copyfile(source / RNG, tmp / RNG)
    files[RNG] = meta["files"][RNG]
    out = {k: v for k, v in meta.items() if k not in ("layout", "files")}
    out.update(files=files, consolidated_from=str(source), published_at=time.time())
    return publish_folder(dest_root, tmp, final, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=consolidate.__doc__)
    parser.add_argument("source", type=Path, help="a sharded checkpoint folder (step-N)")
    parser.add_argument("dest", type=Path, help="the folder to publish step-N in")
    args = parser.parse_args(argv)
    from bloomrun.trainer.checkpoint import CheckpointError

    try:
        path = consolidate(args.source, args.dest)
    except (CheckpointError, ShardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"consolidated": str(path), "step": json.loads((path / METADATA).read_text())["step"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
