"""Worker functions of the sharded-checkpoint tests (tests/trainer/test_checkpoint_sharded.py):
each runs in every process of a spawned CPU group (gloo, tp_workers.spawn) on the trainer's
tensor-parallel engine, and rank 0 returns what it measured as JSON."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bloomrun.trainer import checkpoint as ckpt
from bloomrun.trainer import parallel, shard_layout, tensor_parallel
from bloomrun.trainer.shard_layout import local_pieces
from bloomrun.trainer.mesh_engine import MeshEngine
from tests.trainer import tp_workers

MODEL = {"hiddenSize": 64, "numHeads": 4, "position": "alibi", "activation": "swiglu"}


def engine_for(model: dict, tensor: int, zero: int, rank: int, world_size: int):
    cfg = tp_workers.trainer_config(model, tensor, zero)
    world, engine = tp_workers.group_engine(MeshEngine, cfg, rank, world_size)
    return cfg, world, engine


def train(cfg, world, engine, first: int, last: int) -> list[float]:
    """Steps first+1 .. last of tp_workers' batches; the global loss of each."""
    data_rank, data_size = parallel.data_parallel(cfg, world)
    losses = []
    for batch in tp_workers.batches(last)[first:]:
        loss_sum = torch.zeros(())
        for micro in tp_workers._micro_batches(batch, data_rank, data_size):
            loss = engine(micro[:, :-1], labels=micro[:, 1:])
            engine.backward(loss)
            loss_sum += loss.detach()
            if engine.is_gradient_accumulation_boundary():
                engine.optimizer.guard_next_step(loss_sum, parallel.gradient_norm(engine.module))
            engine.step()
        dist.all_reduce(loss_sum)
        losses.append(float(loss_sum) / cfg.parallel.tensor / (tp_workers.GLOBAL_BATCH // tp_workers.MICRO))
    return losses


def _state(engine) -> dict[str, torch.Tensor]:
    """Every parameter and moment, gathered (the consolidated format's names)."""
    weights, moments = parallel.gather_full_state(engine, engine.optimizer)
    return {**weights, **moments}


def layout(rank: int, world_size: int, model: dict, tensor: int) -> dict:
    """Each rank's pieces, the assembled full tensors and copy_full_into against the unsharded
    model they were sharded from (perturbed, so biases and LayerNorms differ too): exact."""
    cfg = tp_workers.trainer_config(model, tensor)
    world = parallel.World(rank=rank, local_rank=rank, world_size=world_size, node_rank=0, device="cpu")
    reference, model_copy = tp_workers.perturbed_pair(cfg)
    engine = MeshEngine.create(model_copy, cfg, world, torch.device("cpu"))
    expected = dict(reference.named_parameters())
    with torch.no_grad():
        return _check_layout(engine, expected)


def _check_layout(engine, expected: dict[str, torch.Tensor]) -> dict:
    piece_error, multi, covered = 0.0, [], {}
    for name, param in engine.module.named_parameters():
        local, found = param.to_local(), local_pieces(param)
        if len(found) > 1:
            multi.append(name)
        for p in found:
            want = expected[name][tuple(slice(o, o + n) for o, n in zip(p.global_offset, p.size))]
            got = local[tuple(slice(o, o + n) for o, n in zip(p.local_offset, p.size))]
            piece_error = max(piece_error, float((want - got).abs().max()))
        covered[name] = [sum(math.prod(p.size) for p in found), local.numel(), expected[name].numel()]
    gathered = max(float((tensor_parallel.full_tensor(p) - expected[n]).abs().max())
                   for n, p in engine.module.named_parameters())
    for name, param in engine.module.named_parameters():
        param.to_local().zero_()
        tensor_parallel.copy_full_into(param, expected[name])
    copied = max(float((tensor_parallel.full_tensor(p) - expected[n]).abs().max())
                 for n, p in engine.module.named_parameters())
    return {"piece_error": piece_error, "gathered_error": gathered, "copied_error": copied,
            "multi_piece": sorted(multi), "covered": covered}


@contextlib.contextmanager
def no_gathering():
    """Every way this code base has to build a full tensor from shards fails inside: a sharded
    save that used one would hold more than its own shard."""
    def refuse(*args, **kwargs):
        raise AssertionError("a full tensor was gathered during a sharded save")

    saved = (DTensor.full_tensor, DTensor.redistribute, shard_layout.assemble_full, parallel.gather_full_state)
    DTensor.full_tensor = DTensor.redistribute = shard_layout.assemble_full = parallel.gather_full_state = refuse
    try:
        yield
    finally:
        DTensor.full_tensor, DTensor.redistribute, shard_layout.assemble_full, parallel.gather_full_state = saved


def save_and_train(rank: int, world_size: int, model: dict, tensor: int, root: str, save_at: list[int],
                   steps: int) -> dict:
    """Train `steps` steps, saving a sharded checkpoint after each step in `save_at`; the losses
    and, per checkpoint, how far its assembled tensors are from the gathered state."""
    cfg, world, engine = engine_for(model, tensor, 1, rank, world_size)
    losses, errors, done = [], {}, 0
    for stop in [*save_at, steps]:
        losses += train(cfg, world, engine, done, stop)
        done = stop
        if stop == steps and stop not in save_at:
            break
        state = ckpt.TrainState(step=stop, optimizer_steps=parallel.optimizer_steps(engine.optimizer))
        with no_gathering():
            path = ckpt.save(Path(root), state, engine, engine.optimizer, world, keep_last=10,
                             extra={"world_size": world_size}, layout=ckpt.SHARDED)
        gathered = _state(engine)
        if rank == 0:
            saved = {**ckpt.read_tensors(path, "model.safetensors"), **ckpt.read_tensors(path, "optimizer.safetensors")}
            assert set(saved) == set(gathered)
            errors[stop] = max(float((saved[n] - gathered[n]).abs().max()) for n in saved)
    return {"losses": losses, "errors": errors}


def resume_and_train(rank: int, world_size: int, model: dict, tensor: int, root: str, steps: int) -> dict:
    """Resume the newest complete checkpoint in `root` and train to `steps`: the losses, and
    how far the loaded state is from the checkpoint's assembled tensors."""
    cfg, world, engine = engine_for(model, tensor, 1, rank, world_size)
    path, meta = ckpt.choose(Path(root), world, torch.device("cpu"))
    state = ckpt.load(path, meta, engine, engine.optimizer, world)
    loaded = _state(engine)
    error = None
    if rank == 0:
        saved = {**ckpt.read_tensors(path, "model.safetensors"), **ckpt.read_tensors(path, "optimizer.safetensors")}
        error = max(float((saved[n] - loaded[n]).abs().max()) for n in saved)
    return {"step": state.step, "optimizer_steps": parallel.optimizer_steps(engine.optimizer),
            "load_error": error, "losses": train(cfg, world, engine, state.step, steps)}


def warm_start(rank: int, world_size: int, model: dict, tensor: int, root: str) -> dict:
    """checkpoint.initFrom without the optimizer: the newest checkpoint's weights, zero
    moments, AdamW's step count 0."""
    cfg, world, engine = engine_for(model, tensor, 1, rank, world_size)
    path, meta = ckpt.newest_complete(Path(root)) if rank == 0 else (None, None)
    choice = [str(path), meta]
    dist.broadcast_object_list(choice, src=0)
    path, meta = Path(choice[0]), choice[1]
    ckpt.load_weights(path, meta, engine, engine.optimizer, with_moments=False)
    weights, moments = parallel.gather_full_state(engine, engine.optimizer)
    saved = ckpt.read_tensors(path, "model.safetensors")
    return {"weight_error": max(float((saved[n] - weights[n]).abs().max()) for n in saved),
            "largest_moment": max(float(m.abs().max()) for m in moments.values()),
            "optimizer_steps": parallel.optimizer_steps(engine.optimizer), "step": meta["step"]}
