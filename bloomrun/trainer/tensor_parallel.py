"""Tensor parallelism for the single-device Bloom, applied from outside (torchtitan's
`parallelize_llama`): `parallelize(model, tp_mesh)` turns its parameters into DTensors with
torch.distributed.tensor.parallel plans and gives it kernels that compute on local shards.

What each rank of a tensor group of T holds (Megatron's layout, BLOOM's TP 4):
- fused QKV: colwise. BLOOM's layout interleaves per head ([q_h, k_h, v_h] rows for each head
  h), so a contiguous row shard is H/T whole heads with their q, k and v; attention output
  `dense`: rowwise (one all-reduce).
- MLP: `dense_h_to_4h` colwise, `dense_4h_to_h` rowwise (one all-reduce). SwiGLU's fused
  (gate, up) rows are sharded per half (`_StridedShard`, split factor 2), so a rank holds the
  matching slices of gate and up.
- the tied embedding: vocabulary-parallel (rows), its lookup all-reduced; the LM head reuses the
  shard, and the loss is computed over the local vocabulary slice with a MAX and two SUM
  all-reduces (`vocab_parallel_cross_entropy`), so no rank builds the full logits.
- LayerNorms and the learned position table: replicated DTensors (their gradients are equal on
  every rank, since their inputs are), so every parameter is a DTensor, which the optimizer,
  FSDP2 and torch.distributed.checkpoint need.
- ALiBi: a rank's heads take their slopes from the *global* heads' series (a forward pre-hook
  slices the model's slopes), never a series restarted for H/T heads.
- rotary: the angles depend on the head dimension only, which TP does not split.

The model's ops keep their signatures: `tensor_parallel_kernels` wraps a kernel set so each op
sees local tensors (`DTensor.to_local`, differentiable), so the torch ops and the Triton
kernels alike run on local shards; only the loss is replaced.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

from bloomrun.trainer import shard_layout
from bloomrun.trainer.model import ops
from bloomrun.trainer.model.bloom import Attention, LayerNorm

MESH_DIMS = ("dp", "tp")


def build_mesh(device: str, world_size: int, tensor: int) -> DeviceMesh:
    """(dp, tp) mesh, tp innermost: a tensor group is `tensor` consecutive ranks, which
    torchrun places on one node (the spec keeps gpusPerNode a multiple of tensor)."""
    if world_size % tensor:
        raise ValueError(f"world size {world_size} is not a multiple of parallel.tensor ({tensor})")
    return init_device_mesh(device, (world_size // tensor, tensor), mesh_dim_names=MESH_DIMS)


# ----------------------------------------------------------------------------- the loss


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` where `weight` is this rank's vocabulary rows
    [start, start + V/T) and `hidden` is the same on every rank of `group` (Megatron's
    vocab-parallel cross-entropy, fused with the LM head's matmul).

    Forward: local logits; the row max all-reduced with MAX, the sum of exponentials and the
    target's logit with SUM. Backward: (softmax - onehot) / n_valid on the local slice gives
    d(weight) directly; d(hidden) is a partial sum over the slices, all-reduced with SUM.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, start, ignore_index, group):
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else hidden.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            logits = F.linear(h, w).float()  # (N, V/T)
            row_max = logits.max(dim=-1).values
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            shifted = logits.sub_(row_max[:, None])  # in place: logits are not needed again
            sum_exp = shifted.exp().sum(dim=-1)
            local = targets - start
            in_slice = (local >= 0) & (local < w.shape[0]) & (targets != ignore_index)
            picked = shifted.gather(1, local.clamp(0, w.shape[0] - 1)[:, None])[:, 0]
            target_logit = torch.where(in_slice, picked, 0.0)
            reduced = torch.stack([sum_exp, target_logit])  # one all-reduce for both sums
            dist.all_reduce(reduced, group=group)
            sum_exp, target_logit = reduced
            valid = targets != ignore_index
            num_valid = valid.sum()
            loss = torch.where(valid, sum_exp.log() - target_logit, 0.0).sum() / num_valid
        ctx.save_for_backward(h, w, shifted, sum_exp, local, in_slice, valid, num_valid)
        ctx.group, ctx.dtypes = group, (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, d_loss):
        h, w, shifted, sum_exp, local, in_slice, valid, num_valid = ctx.saved_tensors
        grad = shifted.exp() / sum_exp[:, None]  # softmax over the local slice
        rows = in_slice.nonzero()[:, 0]
        grad[rows, local[rows]] -= 1.0
        grad.mul_((valid.float() * d_loss / num_valid)[:, None])
        grad = grad.to(h.dtype)
        d_hidden = grad @ w  # a partial sum: this rank's vocabulary slice only
        dist.all_reduce(d_hidden, group=ctx.group)
        d_weight = grad.t() @ h
        hidden_dtype, weight_dtype = ctx.dtypes
        return d_hidden.to(hidden_dtype), d_weight.to(weight_dtype), None, None, None, None


def vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 ignore_index: int = -100) -> torch.Tensor:
    """`ops.linear_cross_entropy` for a vocabulary-sharded (Shard(0)) DTensor weight."""
    assert isinstance(weight, DTensor) and weight.placements == (Shard(0),), weight
    mesh = weight.device_mesh
    rows = weight.shape[0] // mesh.size()  # the vocabulary is padded to a multiple of 128: even shards
    start = mesh.get_local_rank() * rows
    hidden = local_part(hidden)
    return _VocabParallelCrossEntropy.apply(hidden, weight.to_local(), targets, start, ignore_index,
                                            mesh.get_group())


# ----------------------------------------------------------------------- local kernels


def local_part(value):
    """This rank's tensor: a DTensor's local shard, a plain tensor itself."""
    return value.to_local() if isinstance(value, DTensor) else value


def _on_local_shards(op):
    def call(*args):
        return op(*(local_part(a) for a in args))

    call.__name__ = call.__qualname__ = f"local_{getattr(op, '__name__', 'op')}"
    return call


def tensor_parallel_kernels(base: ops.Kernels) -> ops.Kernels:
    """`base`'s ops on local shards, and the vocabulary-parallel loss."""
    wrapped = {name: _on_local_shards(getattr(base, name)) for name in ops.OPS}
    wrapped["linear_cross_entropy"] = vocab_parallel_cross_entropy
    return dataclasses.replace(base, name=f"{base.name}+tp", **wrapped)


# --------------------------------------------------------------------------- the plans


class PairedColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a fused (gate, up) projection: each half is sharded on its own, so
    rank r holds [gate_r; up_r] and the activation's chunk(2) splits the local output right."""

    def _partition_linear_fn(self, name, module, device_mesh):
        for param_name, param in module.named_parameters():
            placement = _StridedShard(0, split_factor=2)
            sharded = distribute_tensor(param, device_mesh, [placement], src_data_rank=self.src_data_rank)
            module.register_parameter(param_name, nn.Parameter(sharded, requires_grad=param.requires_grad))


def block_plan(activation: str) -> dict:
    """Per block. The MLP's first projection is called as F.linear on its weight (its bias is
    fused into the activation), not as a module, so the MLP's input is made a replicated
    DTensor where the MLP starts, and the weight's placement does the rest."""
    return {
        "self_attention.query_key_value": ColwiseParallel(),
        "self_attention.dense": RowwiseParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),),
                                  use_local_output=False),
        "mlp.dense_h_to_4h": PairedColwiseParallel() if activation == "swiglu" else ColwiseParallel(),
        "mlp.dense_4h_to_h": RowwiseParallel(),
    }


def _replicate_inputs(module, inputs, mesh):
    return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) if isinstance(x, torch.Tensor)
                 and not isinstance(x, DTensor) else x for x in inputs)


def _local_output(module, output, mesh):
    return local_part(output)


def _alibi_slice_hook(start: int, stop: int):
    """Attention's pre-hook: the local heads' slopes, sliced from the global series."""

    def hook(module, args):
        x, positions = args
        if positions.alibi_slopes is None:
            return None
        return x, positions._replace(alibi_slopes=positions.alibi_slopes[start:stop])

    return hook


def parallelize(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard `model` in place over `tp_mesh` (see the module docstring); every rank must hold
    the same full weights (the same seed), of which each keeps its shard. `model` is a Bloom
    or one pipeline stage of it (pipeline.BloomStage: blocks in a dict, the embedding on the
    first stage, the tied head's copy on the last, sharded by vocabulary alike)."""
    args, size, rank = model.args, tp_mesh.size(), tp_mesh.get_local_rank()
    if args.num_heads % size:  # config.check_parallel refuses this first; here for direct callers
        raise ValueError(f"parallel.tensor ({size}) must divide numHeads ({args.num_heads})")
    heads = args.num_heads // size
    for block in (model.h.values() if isinstance(model.h, nn.ModuleDict) else model.h):
        parallelize_module(block, tp_mesh, block_plan(args.activation), src_data_rank=None)
    if getattr(model, "word_embeddings", None) is not None:
        parallelize_module(model, tp_mesh, {"word_embeddings": RowwiseParallel(input_layouts=Replicate())},
                           src_data_rank=None)
    for name, module in model.named_modules():
        if isinstance(module, LayerNorm):
            distribute_module(module, tp_mesh)  # parameters become replicated DTensors
        elif isinstance(module, Attention):
            module.register_forward_pre_hook(_alibi_slice_hook(rank * heads, (rank + 1) * heads))
    if getattr(model, "position_embeddings", None) is not None:
        distribute_module(model.position_embeddings, tp_mesh, input_fn=_replicate_inputs, output_fn=_local_output)
    return model.use_kernels(tensor_parallel_kernels(model.kernels))


# ---------------------------------------------------------- norms and full tensors


@torch.no_grad()
def gradient_norm(parameters) -> torch.Tensor:
    """L2 norm of the whole (unsharded) gradient of DTensor or plain parameters, in one
    all-reduce over the world: each rank adds its local squares weighted by how many distinct
    shards its tensor has over the world size, so a shard held by k ranks counts once."""
    world = dist.get_world_size()
    total = torch.zeros((), dtype=torch.float64)
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        local = local_part(grad)
        total += torch.linalg.vector_norm(local.float()).double().cpu() ** 2 * distinct_shards(grad) / world
    dist.all_reduce(total)
    return total.sqrt().float()


def distinct_shards(value: torch.Tensor) -> int:
    """How many different pieces a DTensor is cut into over its mesh (the product of its
    sharded dimensions' sizes; 1 when replicated, and for a plain tensor): each piece is held
    by mesh size / distinct ranks, so squares weighted distinct / mesh size count it once."""
    if not isinstance(value, DTensor):
        return 1
    mesh = value.device_mesh
    return math.prod(mesh.size(i) for i, p in enumerate(value.placements) if not p.is_replicate())


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The unsharded value (a collective for a DTensor: every rank of its mesh calls it),
    assembled from each rank's pieces: DTensor's own full_tensor() misplaces SwiGLU's rows
    under FSDP2 (shard_layout.py)."""
    return shard_layout.assemble_full(value)


def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Set `target` (a DTensor or plain tensor) from the full value every rank holds: a
    DTensor keeps its own pieces of it (no communication)."""
    shard_layout.copy_full_into(target, full)
