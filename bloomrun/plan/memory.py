"""Memory per GPU of a shape in a layout: an estimate to rule layouts in or out, not a profile.

What it counts, on the pipeline's fullest stage (the first: its blocks plus the embedding):
- model states, 16 bytes per parameter as in the ZeRO paper's mixed-precision Adam (Rajbhandari
  et al. 2020, K = 12): bf16 weights 2 + bf16 gradients 2 + fp32 master weights, momentum and
  variance 12; ZeRO stage 1 splits the 12 over the data-parallel ranks, stage 2 also the
  gradients, stage 3 also the weights;
- activations in bf16 (Korthikanti et al. 2022, "Reducing Activation Recomputation", eq. 2,
  no sequence parallelism): a block's full activations are s b h (10 + 24/t + 5 a s / (h t))
  bytes; with activation recompute only each block's input (2 s b h bytes) is kept, plus one
  block's full activations while it is recomputed; under 1F1B the first stage holds
  min(PP, micro-batches) micro-batches in flight;
- the logits of one micro-batch in fp32 (4 s b V / t bytes), for the loss.
Not counted: communication buffers, the allocator's fragmentation, the CUDA context and
kernels' workspaces; hence the headroom a layout must leave (MEMORY_HEADROOM).
"""

from __future__ import annotations

from dataclasses import dataclass

from bloomrun.plan.arithmetic import ParameterGroups
from bloomrun.plan.rules import EMBEDDING_STAGES, Layout
from bloomrun.trainer.config import Shape

GIB = 2**30

# Memory of one GPU, GiB (nvidia-smi's MiB / 1024): A100 40,960 and 81,920 MiB; H100 SXM
# 81,559 MiB; H200 143,771 MiB.
GPU_MEMORY_GIB: dict[str, float] = {
    "a100-40gb": 40.0,
    "a100-80gb": 80.0,
    "h100-80gb": 79.6,
    "h200": 140.4,
}

# A layout must leave 10% of the card for what the estimate does not count (above).
MEMORY_HEADROOM = 0.9

BYTES_WEIGHTS, BYTES_GRADS, BYTES_OPTIMIZER = 2, 2, 12  # bf16, bf16, fp32 master + Adam's m and v
BYTES_ACTIVATION, BYTES_LOGIT = 2, 4


@dataclass(frozen=True)
class Memory:
    params_per_gpu: int
    states_bytes: float
    activations_bytes: float
    capacity_gib: float

    @property
    def total_gib(self) -> float:
        return (self.states_bytes + self.activations_bytes) / GIB

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.capacity_gib * MEMORY_HEADROOM


def gpu_memory_gib(gpu: str) -> float:
    key = gpu.strip().lower()
    if key not in GPU_MEMORY_GIB:
        raise ValueError(f"gpu: unknown GPU type {gpu!r}; known: {', '.join(sorted(GPU_MEMORY_GIB))}")
    return GPU_MEMORY_GIB[key]


def stage_parameters(groups: ParameterGroups, layout: Layout) -> int:
    """Parameters on one GPU of the fullest pipeline stage: stages hold (layers + 2) / PP slots,
    the first stage's first slot being the embedding and the last stage's last the LM head (a
    copy of the tied embedding); the vocabulary and the blocks split over TP."""
    if layout.pp == 1:
        stage = groups.total
    else:
        slots = (groups.num_layers + EMBEDDING_STAGES) // layout.pp
        first = (slots - 1) * groups.per_block + groups.embedding
        last = (slots - 1) * groups.per_block + groups.embedding + groups.final_norm
        middle = slots * groups.per_block
        stage = max(first, last, middle)
    return -(-stage // layout.tp)


def states_bytes(params: int, zero_stage: int, dp: int) -> float:
    """Weights, gradients and Adam's states of `params` parameters under ZeRO `zero_stage`."""
    weights, grads, optimizer = params * BYTES_WEIGHTS, params * BYTES_GRADS, params * BYTES_OPTIMIZER
    if zero_stage >= 1:
        optimizer /= dp
    if zero_stage >= 2:
        grads /= dp
    if zero_stage >= 3:
        weights /= dp
    return weights + grads + optimizer


def fsdp_states_bytes(params: int, dp: int, zero_stage: int) -> float:
    """Weights, gradients and AdamW's moments of `params` parameters as bloomrun's trainer
    holds them over dp > 1 replicas with FSDP2 (a pipeline stage: trainer/pipeline.py, at
    ZeRO 1; tensor parallelism alone: trainer/mesh_engine.py, by stage), at a step's peak,
    the last backward. Weights are fp32 (autocast keeps no bf16 copy: they are the master
    weights) and each rank's own shards of them (4) and of the moments (8) are 1/dp. At 0-1
    the weights are gathered whole from the forward on and kept through the step's
    micro-batches, and the gradients accumulate whole until the last backward's
    reduce-scatter: + 4 + 4 bytes (at dp 8: 9.5 a parameter, against 16 unsharded and
    ZeRO-1's 5.5). At 2 the gradients are reduce-scattered every micro-batch (+ 4/dp); at 3
    the weights are freed after each block's forward and backward too (+ 4/dp)."""
    own = (4 + 8) / dp
    if zero_stage <= 1:
        return params * (4 + 4 + own)
    return params * ((4 if zero_stage == 2 else 0) + own + 4 / dp)


def activations_bytes(shape: Shape, padded_vocab: int, layout: Layout, global_batch: int, recompute: bool) -> float:
    s, b, h, a, t = shape.seq_length, layout.micro_batch, shape.hidden_size, shape.num_heads, layout.tp
    full_block = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    layers = shape.num_layers if layout.pp == 1 else (shape.num_layers + EMBEDDING_STAGES) // layout.pp
    in_flight = min(layout.pp, max(1, layout.micro_batches(global_batch)))
    if recompute:
        kept = in_flight * layers * BYTES_ACTIVATION * s * b * h + full_block
    else:
        kept = in_flight * layers * full_block
    return kept + BYTES_LOGIT * s * b * padded_vocab / t


def memory_per_gpu(shape: Shape, groups: ParameterGroups, padded_vocab: int, layout: Layout, global_batch: int,
                   zero_stage: int, recompute: bool, gpu: str, fsdp: bool = False) -> Memory:
    """`fsdp`: the states as bloomrun's trainer holds them under FSDP2 (fsdp_states_bytes)
    instead of the ZeRO paper's model for `zero_stage`."""
    params = stage_parameters(groups, layout)
    states = (fsdp_states_bytes(params, layout.dp, zero_stage) if fsdp
              else states_bytes(params, zero_stage, layout.dp))
    return Memory(
        params_per_gpu=params,
        states_bytes=states,
        activations_bytes=activations_bytes(shape, padded_vocab, layout, global_batch, recompute),
        capacity_gib=gpu_memory_gib(gpu),
    )
