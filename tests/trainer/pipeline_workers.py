"""Worker functions of the pipeline tests, run by tp_workers.spawn in a CPU group (gloo);
rank 0 returns what the group measured.

The reference is tp_workers.train_reference: the same model on one device, trained by the
trainer's stage-0 loop (GuardedAdamW, clipping with the measured norm). The pipelined run
goes through PipelineEngine, the trainer's pipeline engine.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from bloomrun.trainer import parallel
from bloomrun.trainer.config import TrainerConfig
from bloomrun.trainer.pipeline import HEAD, PipelineEngine
from bloomrun.trainer.tensor_parallel import local_part
from tests.trainer.tp_workers import GLOBAL_BATCH, MICRO, batches, group_engine, train_reference

LAYERS = 4  # 4 + 2 slots: 2 and 3 stages both divide them


def pipeline_config(model: dict, pipeline: int, micro: int = MICRO, tensor: int = 1,
                    grad_clip: float = 1.0) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "model": {"preset": None, "numLayers": LAYERS, "hiddenSize": 32, "numHeads": 4, "seqLength": 16,
                  "vocabSize": 300, "kernels": "torch", **model},
        "data": {"sources": [{"path": "unused"}]},
        "optim": {"lr": 3e-3, "warmupTokens": 0, "gradClip": grad_clip},
        "training": {"globalBatchSize": GLOBAL_BATCH, "microBatchSize": micro, "trainSteps": 20, "zeroStage": 1},
        "parallel": {"pipeline": pipeline, "tensor": tensor},
    })


def train_pipeline(cfg: TrainerConfig, steps: int, rank: int, world_size: int) -> dict:
    """The steps through PipelineEngine: each replica's share of every global batch."""
    world, engine = group_engine(PipelineEngine, cfg, rank, world_size)
    data_rank, data_size = parallel.data_parallel(cfg, world)
    micro = cfg.training.micro_batch_size
    losses, norms, seconds, heads_equal = [], [], [], []
    for batch in batches(steps):
        start = time.perf_counter()
        loss_sum, norm = engine.step_batch(list(batch.chunk(data_size)[data_rank].split(micro)))
        dist.all_reduce(loss_sum)  # each tensor rank of a replica's last stage holds its loss; the others 0
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss_sum) / cfg.parallel.tensor / (GLOBAL_BATCH // micro))
        norms.append(float(norm))
        heads_equal.append(_tied_copies_equal(engine))
    return {"losses": losses, "norms": norms, "seconds": seconds, "heads_equal": all(heads_equal),
            "names": sorted(engine.stage_names()), "moments_held": _moments_held(engine)}


def _moments_held(engine: PipelineEngine) -> float:
    """The share of its stage's AdamW moments this rank holds: 1 unsharded, 1/dp under FSDP2."""
    state = [engine.optimizer.state[p]["exp_avg"] for p in engine.module.parameters()]
    return sum(local_part(m).numel() for m in state) / sum(m.numel() for m in state)


def _tied_copies_equal(engine: PipelineEngine) -> bool:
    """Every copy of the tied weight (first stages' embeddings, last stages' heads) is equal,
    shard by shard under tensor parallelism and FSDP2 (a copy per pipeline: its tensor and,
    when sharded, data-parallel rank's shard)."""
    mine = dict(engine.module.named_parameters()).get(HEAD)
    tensor_rank = dist.get_rank(engine.groups["tp"]) if engine.groups["tp"] is not None else 0
    data_rank = dist.get_rank(engine.groups["dp"]) if engine.sharded else 0
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, None if mine is None else ((tensor_rank, data_rank), local_part(mine).detach()))
    copies = [copy for copy in held if copy is not None]
    shards = {key: [w for k, w in copies if k == key] for key, _ in copies}
    return len(copies) == 2 * (dist.get_world_size() // engine.num_stages) and \
        all(torch.equal(ws[0], w) for ws in shards.values() for w in ws)


def trajectories(rank: int, world_size: int, model: dict, pipeline: int, steps: int, micro: int = MICRO,
                 tensor: int = 1, grad_clip: float = 1.0) -> dict:
    reference = train_reference(pipeline_config(model, 1, micro, grad_clip=grad_clip), steps)
    names, held = [None] * world_size, [None] * world_size
    result = train_pipeline(pipeline_config(model, pipeline, micro, tensor, grad_clip), steps, rank, world_size)
    dist.all_gather_object(names, result.pop("names"))
    dist.all_gather_object(held, result.pop("moments_held"))
    return {"reference": reference, "pipeline": result, "names": names, "moments_held": held}


def skips_together(rank: int, world_size: int) -> dict:
    """A non-finite loss on the last stage only (its ln_f poisoned; on every replica's, which
    with 4 ranks are FSDP2-sharded): every stage skips the step, and the next, healthy step
    (ln_f restored) is applied everywhere."""
    cfg = pipeline_config({}, 2)
    world, engine = group_engine(PipelineEngine, cfg, rank, world_size)
    data_rank, data_size = parallel.data_parallel(cfg, world)
    before = {n: local_part(p).detach().clone() for n, p in engine.module.named_parameters()}
    steps = [batch.chunk(data_size)[data_rank] for batch in batches(2)]
    if engine.module.is_last:
        saved = engine.module.ln_f.weight.detach().clone()
        with torch.no_grad():
            engine.module.ln_f.weight.fill_(float("nan"))
    loss, norm = engine.step_batch(list(steps[0].split(MICRO)))
    first = bool(engine.optimizer.take_applied())
    unchanged = all(torch.equal(local_part(p), before[n]) for n, p in engine.module.named_parameters()
                    if n != "ln_f.weight")
    if engine.module.is_last:
        with torch.no_grad():
            engine.module.ln_f.weight.copy_(saved)
    engine.step_batch(list(steps[1].split(MICRO)))
    second = bool(engine.optimizer.take_applied())
    verdicts = [None] * world_size
    dist.all_gather_object(verdicts, {"first": first, "unchanged": unchanged, "second": second,
                                      "loss_finite": bool(torch.isfinite(loss)),
                                      "norm_finite": bool(torch.isfinite(norm)), "sharded": engine.sharded})
    return {"verdicts": verdicts}
