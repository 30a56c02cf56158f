"""Claim: at the 7b1 and 176b shapes, ZeRO-3 alone moves far more bytes per GPU per step than
tensor x pipeline x data parallelism, and over the slow (inter-node) links; computed from the
model's shape for bloomrun's engines as they run, and checked against the trainer's own
collectives counted at a small shape on CPU ranks (`--measure`).

    python -m bench.comm_volume            # the 7b1 and 176b table
    python -m bench.comm_volume --measure  # counted vs formula at a small shape, gloo ranks

Bytes each rank sends per optimiser step, by collective, ring algorithms (all-reduce of M:
2 (n-1)/n M; all-gather and reduce-scatter of M in total: (n-1)/n M; send M), as
bloomrun/trainer/comm_count.py counts them. fp32 weights and gradients (bf16 autocast keeps
fp32 master weights, so ZeRO-3 and FSDP2 gather fp32), activations in the autocast dtype
(bf16 on a GPU, fp32 on the CPU: parallel.precision), no activation recompute. Left out: the
step's scalar all-reduces (gradient norm, the optimizer's skip flag: 12-18 bytes).

- ZeRO-3 (DeepSpeed stage 3, parallel.build_deepspeed_config), n ranks, per micro-batch: an
  all-gather of the gathered weights (more than stage3_param_persistence_threshold = 100k
  elements) for the forward, and again for the backward unless DeepSpeed keeps them (reuse
  within stage3_max_reuse_distance, 1e9 elements: the blocks whose later blocks' forward and
  backward plus the gathered embedding/head stay under it); a reduce-scatter of all the
  gradients. Once per step, the persistent (small) weights are all-gathered after the update.
  At 7b1 and 176b the head alone (1.03e9 and 3.6e9 elements) exceeds the reuse distance, so
  every block is gathered twice; the tied embedding's third gather (for the head) is not
  modelled.
- T x DP without pipeline (MeshEngine: DTensor TP, FSDP2 over DP): per micro-batch and layer 2
  activation all-reduces forward and 2 backward over T; the vocabulary-parallel embedding's
  forward all-reduce and the loss's (3 fp32 per token forward, d(hidden) backward); FSDP2 as
  MeshEngine sets it by zeroStage: at 0-1 one all-gather of the local weights and one
  reduce-scatter of the gradients a step; at 2 the gradients reduce-scattered every
  micro-batch; at 3 also each block's weights gathered for its forward and again for its
  backward, and the root's (embedding, LayerNorms) once, every micro-batch. A tensor rank holds 1/T of the sharded weights and
  LayerNorms, row-parallel biases and learned positions whole.
- T x P x DP (PipelineEngine, 1F1B): the same TP terms on each stage; per micro-batch each
  stage but the last sends its activations forward and each but the first their gradient
  back, whole on every tensor rank (no scatter-gather): 2 (P-1)/P activations on average;
  once per step the tied embedding's gradient all-reduced between the first and last stage,
  and over DP, once per step: where parallel.zero_stage says 1 for a pipeline, FSDP2 shards
  the stage (an all-gather of its weights, a reduce-scatter of its gradients, the tied
  all-reduce on a dp shard), where it says 0, an all-reduce of its whole gradients.
Per-rank figures of a pipeline are the average over its stages.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from bloomrun.trainer.config import ModelConfig
from bloomrun.trainer.model import Bloom, ModelArgs

GPU_ACTIVATION_BYTES = 2  # bf16 autocast
STATE_BYTES = 4  # fp32 weights and gradients
PERSISTENCE_THRESHOLD = 100_000  # parallel.build_deepspeed_config's stage3_param_persistence_threshold
MAX_REUSE_DISTANCE = 1e9  # DeepSpeed's default stage3_max_reuse_distance (elements)
TENSOR_REPLICATED = ("layernorm", "ln_f", "dense.bias", "dense_4h_to_h.bias", "position_embeddings")


@dataclass(frozen=True)
class Layout:
    gpus: int
    tensor: int
    pipeline: int
    micro: int
    global_batch: int
    zero: int = 1  # how often MeshEngine's FSDP2 moves weights and gradients

    @property
    def data(self) -> int:
        return self.gpus // (self.tensor * self.pipeline)

    @property
    def name(self) -> str:
        return f"T{self.tensor} x P{self.pipeline} x DP{self.data}"


def model_args(model: ModelConfig) -> ModelArgs:
    return ModelArgs.from_config(model)


def parameter_sizes(args: ModelArgs) -> dict[str, int]:
    """name -> elements, from the model on the meta device."""
    import torch

    with torch.device("meta"):
        return {name: p.numel() for name, p in Bloom(args).named_parameters()}


def tensor_local(name: str, numel: int, tensor: int) -> float:
    """Elements a tensor rank holds (tensor_parallel.parallelize's plan)."""
    return numel if any(key in name for key in TENSOR_REPLICATED) else numel / tensor


def _block(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("h.") else None


# ------------------------------------------------------------------- the formulas, pure


def zero3(args: ModelArgs, layout: Layout, activation_bytes: int = GPU_ACTIVATION_BYTES) -> dict[tuple, float]:
    """(kind, what) -> bytes per rank per step; activation_bytes unused (no activations move)."""
    n, sizes = layout.gpus, parameter_sizes(args)
    micro_batches = layout.global_batch / (layout.micro * n)  # per rank; fractional: an average
    gathered = {name: k for name, k in sizes.items() if k > PERSISTENCE_THRESHOLD}
    persistent = sum(sizes.values()) - sum(gathered.values())
    per_block = [sum(k for name, k in gathered.items() if _block(name) == i) for i in range(args.num_layers)]
    outside = sum(gathered.values()) - sum(per_block)
    kept = sum(size for i, size in enumerate(per_block)  # no re-gather: reused within the distance
               if 2 * sum(per_block[i + 1:]) + outside < MAX_REUSE_DISTANCE)
    ring = (n - 1) / n * STATE_BYTES
    return {("all-gather", "weights, fwd + bwd"): ring * (2 * sum(gathered.values()) - kept) * micro_batches,
            ("all-gather", "persistent weights, after the step"): ring * persistent,
            ("reduce-scatter", "gradients"): ring * sum(sizes.values()) * micro_batches}


def bloomrun_layout(args: ModelArgs, layout: Layout,
                    activation_bytes: int = GPU_ACTIVATION_BYTES) -> dict[tuple, float]:
    """(kind, what) -> bytes per rank per step for MeshEngine (P = 1) or PipelineEngine."""
    t, p, d = layout.tensor, layout.pipeline, layout.data
    sizes = parameter_sizes(args)
    micro_batches = layout.global_batch / (layout.micro * d)  # per pipeline replica
    activation = layout.micro * args.seq_length * args.hidden_size * activation_bytes
    ring = 2 * (t - 1) / t
    layers_per_stage = args.num_layers / p
    tensor = micro_batches * ring * activation * (4 * layers_per_stage + 2 / p)  # blocks; embedding, head
    loss = micro_batches * ring * layout.micro * args.seq_length * 3 * 4 / p
    table = {("all-reduce", "TP activations, intra-node"): tensor + loss}
    local = {name: tensor_local(name, k, t) for name, k in sizes.items()}
    shard = (d - 1) / d * STATE_BYTES
    if p > 1:
        head = local["word_embeddings.weight"]
        stage = (sum(local.values()) + head) / p  # a stage's weights, the head's copy on the last
        table[("send", "PP activations and gradients")] = micro_batches * 2 * (p - 1) / p * activation
        if _pipeline_shards(layout):  # FSDP2 over the replicas: gathered, reduce-scattered once a step
            table[("all-reduce", "tied embedding, first + last stage")] = 2 / p * head / d * STATE_BYTES
            table[("all-gather", "FSDP2 stage weights, once")] = shard * stage
            table[("reduce-scatter", "FSDP2 stage gradients, once")] = shard * stage
        else:
            table[("all-reduce", "tied embedding, first + last stage")] = 2 / p * head * STATE_BYTES
            table[("all-reduce", "gradients over DP, once")] = 2 * shard * stage
    elif d > 1:
        whole = sum(local.values())
        if layout.zero == 3:  # each block gathered for its forward and its backward, the root once
            blocks = sum(k for name, k in local.items() if _block(name) is not None)
            table[("all-gather", "FSDP2 weights, per micro-batch")] = shard * (blocks + whole) * micro_batches
        else:
            table[("all-gather", "FSDP2 weights, once")] = shard * whole
        if layout.zero >= 2:
            table[("reduce-scatter", "FSDP2 gradients, per micro-batch")] = shard * whole * micro_batches
        else:
            table[("reduce-scatter", "FSDP2 gradients, once")] = shard * whole
    return {key: value for key, value in table.items() if value}


def _pipeline_shards(layout: Layout) -> bool:
    """Whether PipelineEngine shards its stages over the replicas (FSDP2: ZeRO 1, as
    parallel.zero_stage reports it) or all-reduces whole gradients (ZeRO 0)."""
    from types import SimpleNamespace

    from bloomrun.trainer import parallel

    cfg = SimpleNamespace(parallel=SimpleNamespace(tensor=layout.tensor, pipeline=layout.pipeline),
                          training=SimpleNamespace(zero_stage=layout.zero))
    world = parallel.World(rank=0, local_rank=0, world_size=layout.gpus, node_rank=0, device="cuda")
    return layout.data > 1 and parallel.zero_stage(cfg, world) > 0


def by_kind(table: dict[tuple, float]) -> dict[str, float]:
    kinds: dict[str, float] = {}
    for (kind, _), value in table.items():
        kinds[kind] = kinds.get(kind, 0.0) + value
    return kinds


CASES = [  # (preset, layout): BLOOM-176B's layout and a 7b1 one
    ("7b1", Layout(64, 2, 1, 4, 512)),
    ("176b", Layout(384, 4, 12, 2, 2048)),
]


def computed_rows() -> list[str]:
    rows = ["| shape | GPUs | layout | collective | GB per GPU per step |", "| --- | --- | --- | --- | --- |"]
    for preset, layout in CASES:
        args = model_args(ModelConfig(preset=preset))
        for name, table in (("ZeRO-3", zero3(args, layout)), (layout.name, bloomrun_layout(args, layout))):
            for (kind, what), volume in table.items():
                rows.append(f"| {preset} | {layout.gpus} | {name} | {kind} ({what}) | {volume / 1e9:,.1f} |")
            rows.append(f"| {preset} | {layout.gpus} | {name} | **total** | **{sum(table.values()) / 1e9:,.1f}** |")
    return rows


# ------------------------------------------------------------ measured, on CPU gloo ranks

SMALL_MODEL = {"preset": None, "numLayers": 2, "hiddenSize": 160, "numHeads": 4, "seqLength": 32,
               "vocabSize": 300, "kernels": "torch"}
SMALL_MICRO, SMALL_BATCH = 2, 8
CPU_ACTIVATION_BYTES = 4  # fp32 on the CPU (parallel.precision)
SMALL_LAYOUTS = [  # (label, gpus, tensor, pipeline, zero stage)
    ("ZeRO-3", 4, 1, 1, 3),
    ("T x DP", 4, 2, 1, 1),
    ("T x DP", 4, 2, 1, 3),
    ("P x DP", 4, 1, 2, 1),
    ("T x P", 4, 2, 2, 1),
]


def small_config(gpus: int, tensor: int, pipeline: int, zero: int):
    from bloomrun.trainer.config import TrainerConfig

    return TrainerConfig.model_validate({
        "model": SMALL_MODEL, "data": {"sources": [{"path": "unused"}]},
        "optim": {"lr": 3e-3, "warmupTokens": 0, "gradClip": 1.0},
        "training": {"globalBatchSize": SMALL_BATCH, "microBatchSize": SMALL_MICRO, "trainSteps": 2, "zeroStage": zero},
        "parallel": {"tensor": tensor, "pipeline": pipeline}})


def formula(cfg, gpus: int) -> dict[tuple, float]:
    """The formula of the layout `cfg` runs, at its shape, CPU activations."""
    layout = Layout(gpus, cfg.parallel.tensor, cfg.parallel.pipeline, cfg.training.micro_batch_size,
                    cfg.training.global_batch_size, cfg.training.zero_stage)
    build = zero3 if layout.tensor == layout.pipeline == 1 else bloomrun_layout
    return build(model_args(cfg.model), layout, CPU_ACTIVATION_BYTES)


def count_step(rank: int, gpus: int, cfg) -> dict:
    """Every rank's bytes sent by kind during its second optimiser step (the first builds
    DeepSpeed's trace and the pipeline's shapes), the engine built as the trainer builds it."""
    import torch
    import torch.distributed as dist

    from bloomrun.trainer import parallel
    from bloomrun.trainer.comm_count import CommCounter
    from bloomrun.trainer.model import build_model
    from bloomrun.trainer.trainer import build_engine

    world = parallel.World(rank=rank, local_rank=rank, world_size=gpus, node_rank=0, device="cpu")
    parallel.init_distributed(world)
    torch.manual_seed(cfg.training.seed)
    engine, optimizer = build_engine(build_model(cfg.model, "cpu"), cfg, world, torch.device("cpu"))
    engine.set_train_batch_size(SMALL_BATCH)
    data_rank, data_size = parallel.data_parallel(cfg, world)
    ids = torch.randint(0, 256, (SMALL_BATCH, cfg.model.seq_length + 1), generator=torch.Generator().manual_seed(1))
    micro = list(ids.chunk(data_size)[data_rank].split(SMALL_MICRO))
    _step(engine, optimizer, cfg, world, micro)
    with CommCounter() as counter:
        _step(engine, optimizer, cfg, world, micro)
    counts = [None] * gpus
    dist.all_gather_object(counts, {"sent": dict(counter.sent), "unknown": dict(counter.unknown)})
    return {"counts": counts}


def _step(engine, optimizer, cfg, world, micro_batches) -> None:
    """One optimiser step as Trainer._forward_backward drives the engine."""
    import torch

    from bloomrun.trainer import parallel
    from bloomrun.trainer.pipeline import PipelineEngine

    if isinstance(engine, PipelineEngine):
        engine.step_batch(micro_batches)
        return
    loss_sum = torch.zeros(())
    for batch in micro_batches:
        loss = engine(batch[:, :-1], labels=batch[:, 1:])
        engine.backward(loss)
        loss_sum += loss.detach()
        if engine.is_gradient_accumulation_boundary():
            norm = parallel.gradient_norm(engine.module) if parallel.optimizer_clips(cfg, world) else None
            optimizer.guard_next_step(loss_sum, norm)
        engine.step()


def _entry(rank, gpus, port, out, layout):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(gpus), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    try:
        result = count_step(rank, gpus, small_config(gpus, *layout))
        if rank == 0:
            out.write_text(json.dumps(result))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure(gpus: int, tensor: int, pipeline: int, zero: int) -> list[dict]:
    """Each rank's counted bytes by kind for one step of the layout, on `gpus` gloo ranks."""
    import tempfile
    from pathlib import Path

    import torch.multiprocessing as mp

    from bloomrun.trainer import elastic

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "counts.json"
        mp.start_processes(_entry, args=(gpus, elastic.free_ports(1)[0], out, (tensor, pipeline, zero)),
                           nprocs=gpus, start_method="spawn")
        return json.loads(out.read_text())["counts"]


def mean_by_kind(counts: list[dict]) -> dict[str, float]:
    """The ranks' average bytes by kind (recv sends nothing: left out)."""
    kinds = sorted({kind for c in counts for kind in c["sent"] if kind != "recv"})
    return {kind: sum(c["sent"].get(kind, 0.0) for c in counts) / len(counts) for kind in kinds}


def measured_rows() -> list[str]:
    rows = ["| layout (4 ranks) | collective | counted, bytes per rank | formula | formula / counted |",
            "| --- | --- | --- | --- | --- |"]
    for label, gpus, tensor, pipeline, zero in SMALL_LAYOUTS:
        cfg = small_config(gpus, tensor, pipeline, zero)
        name = label if label == "ZeRO-3" else f"{Layout(gpus, tensor, pipeline, 1, 1).name}, ZeRO {zero}"
        counts = measure(gpus, tensor, pipeline, zero)
        unknown = {op for c in counts for op in c["unknown"]}
        counted, expected = mean_by_kind(counts), by_kind(formula(cfg, gpus))
        for kind in sorted(set(counted) | set(expected)):
            got, want = counted.get(kind, 0.0), expected.get(kind, 0.0)
            ratio = f"{want / got:.4f}" if got else "-"
            rows.append(f"| {name} | {kind} | {got:,.0f} | {want:,.0f} | {ratio} |")
        if unknown:
            rows.append(f"| {name} | not counted: {', '.join(sorted(unknown))} | | | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true",
                        help="count one step's collectives at a small shape on 4 CPU gloo ranks")
    print("\n".join(measured_rows() if parser.parse_args().measure else computed_rows()))


if __name__ == "__main__":
    main()
