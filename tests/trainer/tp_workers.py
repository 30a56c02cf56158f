"""Worker functions of the tensor-parallel tests: each runs in a process of a CPU group (gloo)
started by `spawn`, and rank 0 writes what it measured as JSON for the test to compare.

The reference is the same model unsharded, trained by the same loop the trainer's stage-0
path runs (GuardedAdamW, clipping with the measured norm), in every process of the group
alike; the parallel run goes through MeshEngine, the trainer's tensor-parallel engine.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bloomrun.trainer import elastic, parallel, tensor_parallel
from bloomrun.trainer.config import TrainerConfig
from bloomrun.trainer.mesh_engine import MeshEngine
from bloomrun.trainer.model import build_model

SEQ, MICRO, GLOBAL_BATCH = 16, 2, 8


def spawn(fn, world_size: int, out: Path, *args) -> dict:
    """Run fn(rank, world_size, out, *args) in `world_size` processes; rank 0's JSON result."""
    port = elastic.free_ports(1)[0]
    try:
        mp.start_processes(_entry, args=(fn, world_size, port, out, args), nprocs=world_size, start_method="spawn")
    except mp.ProcessExitedException as err:
        tails = "".join(f"\n--- rank {rank}:\n{path.read_text()[-3000:]}" for rank in range(world_size)
                        if (path := _stderr_file(out, rank)).exists() and path.stat().st_size)
        raise AssertionError(f"{err}; the ranks' stderr, ending with their stacks:{tails or ' empty'}") from err
    return json.loads(out.read_text())


def _stderr_file(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.rank{rank}.stderr")


def _entry(rank, fn, world_size, port, out, args):
    # A rank killed by a signal (CI saw rank 0 end with SIGABRT once, never reproduced here)
    # leaves its stderr, C++'s last words and Python's stacks, for spawn to put in the failure's
    # message: CI shows only the report's tail, where the captured stderr is cut off.
    stderr = _stderr_file(out, rank).open("w")
    os.dup2(stderr.fileno(), 2)
    faulthandler.enable(all_threads=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            out.write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    # Done and written: leave without the interpreter's finalization. CI saw rank 0 of
    # test_checkpoint_sharded end with SIGABRT twice; the time its stderr was kept, after the
    # test's last log line: "terminate called without an active exception", the main thread in
    # no Python frame. That is the crash pytorch#179291 describes at finalization: gloo's C++
    # threads still holding work objects whose tensors need the GIL as the interpreter goes.
    sys.stdout.flush()
    sys.stderr.flush()
    stderr.flush()
    os._exit(0)


def trainer_config(model: dict, tensor: int, zero: int = 1) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "model": {"preset": None, "numLayers": 2, "seqLength": SEQ, "vocabSize": 300, "kernels": "torch", **model},
        "data": {"sources": [{"path": "unused"}]},
        "optim": {"lr": 3e-3, "warmupTokens": 0, "gradClip": 1.0},
        "training": {"globalBatchSize": GLOBAL_BATCH, "microBatchSize": MICRO, "trainSteps": 20, "zeroStage": zero},
        "parallel": {"tensor": tensor},
    })


def batches(steps: int, vocab: int = 257) -> torch.Tensor:
    """(steps, GLOBAL_BATCH, SEQ + 1) token ids, the same in every process."""
    return torch.randint(0, vocab, (steps, GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(7))


def _micro_batches(batch: torch.Tensor, data_rank: int, data_size: int):
    mine = batch.chunk(data_size)[data_rank]
    return mine.split(MICRO)


def train_reference(cfg: TrainerConfig, steps: int) -> tuple[list[float], list[float]]:
    """The unsharded model, one data-parallel replica, the trainer's stage-0 loop."""
    world = parallel.World(rank=0, local_rank=0, world_size=1, node_rank=0, device="cpu")
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg.model, "cpu")
    optimizer = parallel.build_optimizer(model, cfg, world)
    accumulation = GLOBAL_BATCH // MICRO
    losses, norms = [], []
    for batch in batches(steps):
        loss_sum = torch.zeros(())
        for micro in _micro_batches(batch, 0, 1):
            loss = model(micro[:, :-1], labels=micro[:, 1:])
            (loss / accumulation).backward()
            loss_sum += loss.detach()
        norm = parallel.gradient_norm(model)
        optimizer.guard_next_step(loss_sum, norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum) / accumulation)
        norms.append(float(norm))
    return losses, norms


def group_engine(engine_class, cfg: TrainerConfig, rank: int, world_size: int):
    """(world, engine): `engine_class` (MeshEngine, PipelineEngine) on the spawned group, set
    up as the trainer does: the seed's weights on every rank, the batch size, AdamW's state."""
    world = parallel.World(rank=rank, local_rank=rank, world_size=world_size, node_rank=0, device="cpu")
    torch.manual_seed(cfg.training.seed)
    engine = engine_class.create(build_model(cfg.model, "cpu"), cfg, world, torch.device("cpu"))
    engine.set_train_batch_size(GLOBAL_BATCH)
    parallel.init_optimizer_state(engine, engine.optimizer)
    return world, engine


def train_parallel(cfg: TrainerConfig, steps: int, rank: int, world_size: int) -> tuple[list[float], list[float]]:
    """The same steps through MeshEngine on the group: data parallel = world / tensor."""
    world, engine = group_engine(MeshEngine, cfg, rank, world_size)
    data_rank, data_size = parallel.data_parallel(cfg, world)
    losses, norms = [], []
    for batch in batches(steps):
        loss_sum = torch.zeros(())
        for micro in _micro_batches(batch, data_rank, data_size):
            loss = engine(micro[:, :-1], labels=micro[:, 1:])
            engine.backward(loss)
            loss_sum += loss.detach()
            if engine.is_gradient_accumulation_boundary():
                norm = parallel.gradient_norm(engine.module)
                engine.optimizer.guard_next_step(loss_sum, norm)
            engine.step()
        dist.all_reduce(loss_sum)  # every replica's loss, each counted `tensor` times
        losses.append(float(loss_sum) / cfg.parallel.tensor / (GLOBAL_BATCH // MICRO))
        norms.append(float(norm))
    return losses, norms


def trajectories(rank: int, world_size: int, model: dict, tensor: int, zero: int, steps: int) -> dict:
    reference = train_reference(trainer_config(model, 1, zero), steps)
    sharded = train_parallel(trainer_config(model, tensor, zero), steps, rank, world_size)
    return {"reference": reference, "parallel": sharded}


def perturbed_pair(cfg: TrainerConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A model with perturbed weights (so biases and LayerNorms matter) and an equal copy
    to shard, the reference staying unsharded."""
    torch.manual_seed(0)
    reference = build_model(cfg.model, "cpu")
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    copy = build_model(cfg.model, "cpu")
    copy.load_state_dict(reference.state_dict())
    return reference, copy


def logits(rank: int, world_size: int, model: dict, tensor: int) -> dict:
    """Unsharded and tensor-parallel logits of perturbed weights (LayerNorms and biases
    matter), the latter gathered from the vocabulary shards; and each rank's local slopes."""
    cfg = trainer_config(model, tensor)
    reference, sharded = perturbed_pair(cfg)
    mesh = tensor_parallel.build_mesh("cpu", world_size, tensor)
    tensor_parallel.parallelize(sharded, mesh["tp"])
    seen = []
    sharded.h[0].self_attention.register_forward_pre_hook(lambda module, args: seen.append(args[1].alibi_slopes))
    ids = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids)
        hidden = sharded.hidden_states(ids)
        got = torch.nn.functional.linear(hidden, sharded.word_embeddings.weight.full_tensor())
    slopes = [torch.zeros(0)] * world_size
    dist.all_gather_object(slopes, seen[0].tolist())
    return {"max_error": float((got - expected).abs().max()), "scale": float(expected.abs().max()),
            "local_slopes": slopes}


def vocab_parallel_loss(rank: int, world_size: int) -> dict:
    """The vocabulary-parallel loss and its gradients against ops.linear_cross_entropy, with
    ignored rows and targets in every rank's slice."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from bloomrun.trainer.model import ops

    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(24, 16, generator=generator)
    weight = torch.randn(256, 16, generator=generator)
    targets = torch.randint(0, 256, (24,), generator=generator)
    targets[::5] = -100
    ref_hidden, ref_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = ops.linear_cross_entropy(ref_hidden, ref_weight, targets)
    expected.backward()
    mesh = tensor_parallel.build_mesh("cpu", world_size, world_size)["tp"]
    sharded = distribute_tensor(weight, mesh, [Shard(0)], src_data_rank=None).requires_grad_()
    tp_hidden = hidden.clone().requires_grad_()
    got = tensor_parallel.vocab_parallel_cross_entropy(tp_hidden, sharded, targets)
    got.backward()
    return {"loss": [float(expected), float(got)],
            "d_hidden": float((tp_hidden.grad - ref_hidden.grad).abs().max() / ref_hidden.grad.abs().max()),
            "d_weight": float((sharded.grad.full_tensor() - ref_weight.grad).abs().max() / ref_weight.grad.abs().max()),
            "ignored": int((targets == -100).sum()),
            "per_slice": [int(((targets >= r * 128) & (targets < (r + 1) * 128)).sum()) for r in range(world_size)]}
