"""What each rank holds of a tensor-parallel (and FSDP2-sharded) tensor, as rectangles of
the global tensor ("pieces"), and the full value assembled from them.

Why not DTensor's placements: FSDP2 over a tensor-parallel parameter records
(_StridedShard(0, split_factor=T) on dp, <tp placement> on tp), which describes its data
only when the tp placement is Shard(0). For SwiGLU's fused (gate, up) projection
(tp placement _StridedShard(0, split_factor=2): each half sharded on its own) the data FSDP2
keeps is torch.chunk's share of the tensor-parallel shard [gate_t; up_t], while DTensor's
offsets, `full_tensor()` and `distribute_tensor` follow another order: measured on 4 CPU
ranks (T2 x DP2, 2026-12-01), `full_tensor()` of a trained projection was 0.10 away from the
unsharded model's weights (their scale 0.09), the pieces below 2e-6. So the layout is derived
here from the two steps this trainer takes: tensor parallelism (Replicate, Shard, or
_StridedShard: each of the s blocks sharded), then FSDP2, which takes torch.chunk's share
of the tensor-parallel shard's dimension 0 (tests/trainer/test_checkpoint_sharded.py checks
every piece of every tensor against the unsharded model's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

Segment = tuple[int, int, int]  # along one dimension: (global start, local start, length)


@dataclass(frozen=True)
class Piece:
    """A rectangle of the global tensor held contiguously-indexed in the local one."""

    global_offset: tuple[int, ...]
    local_offset: tuple[int, ...]
    size: tuple[int, ...]


def _chunk(size: int, index: int, count: int) -> tuple[int, int]:
    """torch.chunk's share `index` of `count` (what Shard and FSDP2 take): (start, length)."""
    step = -(-size // count)
    start = min(index * step, size)
    return start, max(0, min(step, size - start))


def tensor_segments(shape: tuple[int, ...], placement, rank: int, size: int) -> list[list[Segment]]:
    """Per dimension, the segments rank `rank` of a tensor group of `size` holds."""
    dims = [[(0, 0, n)] for n in shape]
    if isinstance(placement, Replicate) or size == 1:
        return dims
    if isinstance(placement, _StridedShard):  # s blocks along the dimension, each sharded
        dim, blocks = placement.dim, placement.split_factor
        if shape[dim] % (blocks * size):
            raise ValueError(f"dimension {dim} ({shape[dim]}) is not a multiple of {blocks} blocks x {size} ranks")
        block, share = shape[dim] // blocks, shape[dim] // blocks // size
        dims[dim] = [(b * block + rank * share, b * share, share) for b in range(blocks)]
        return dims
    if isinstance(placement, Shard):
        start, length = _chunk(shape[placement.dim], rank, size)
        dims[placement.dim] = [(start, 0, length)]
        return dims
    raise ValueError(f"placement {placement} is not one this trainer builds")


def data_parallel_segments(segments: list[Segment], rank: int, size: int) -> list[Segment]:
    """FSDP2's share of dimension 0: torch.chunk of the (tensor-parallel) local rows."""
    total = sum(length for _g, _l, length in segments)
    lo, length = _chunk(total, rank, size)
    hi = lo + length
    out = []
    for start, local, n in segments:
        a, b = max(local, lo), min(local + n, hi)
        if b > a:
            out.append((start + a - local, a - lo, b - a))
    return out


def pieces_of(segments: list[list[Segment]]) -> list[Piece]:
    """The rectangles: every combination of one segment per dimension (empty ones dropped)."""
    pieces = [Piece((), (), ())]
    for dim_segments in segments:
        pieces = [Piece(p.global_offset + (g,), p.local_offset + (l,), p.size + (n,))
                  for p in pieces for g, l, n in dim_segments if n > 0]
    return pieces


def local_pieces(tensor: torch.Tensor) -> list[Piece]:
    """What this rank holds of `tensor` (a DTensor on the trainer's (dp, tp) mesh or its tp
    submesh, or a plain tensor: all of it)."""
    if not isinstance(tensor, DTensor):
        return pieces_of([[(0, 0, n)] for n in tensor.shape])
    mesh = tensor.device_mesh
    names = mesh.mesh_dim_names or ()
    by_dim = dict(zip(names, tensor.placements))
    unknown = set(names) - {"dp", "tp"}
    if unknown or len(names) != len(tensor.placements):
        raise ValueError(f"a DTensor on mesh dimensions {names}: only (dp, tp) are known")
    shape = tuple(tensor.shape)
    tp = by_dim.get("tp", Replicate())
    segments = tensor_segments(shape, tp, mesh.get_local_rank("tp"), mesh.size(names.index("tp"))) \
        if "tp" in by_dim else [[(0, 0, n)] for n in shape]
    dp = by_dim.get("dp", Replicate())
    if not isinstance(dp, Replicate):
        if not isinstance(dp, (Shard, _StridedShard)) or dp.dim != 0:
            raise ValueError(f"data-parallel placement {dp}: FSDP2 shards dimension 0 only")
        segments[0] = data_parallel_segments(segments[0], mesh.get_local_rank("dp"), mesh.size(names.index("dp")))
    return pieces_of(segments)


def _windows(piece: Piece) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(global, local) index windows of a piece."""
    return (tuple(slice(o, o + n) for o, n in zip(piece.global_offset, piece.size)),
            tuple(slice(o, o + n) for o, n in zip(piece.local_offset, piece.size)))


def writes_pieces(tensor: DTensor) -> bool:
    """Whether this rank is the one (of the ranks holding the same pieces) that contributes
    them: coordinate 0 along every mesh dimension the tensor is replicated over."""
    mesh = tensor.device_mesh
    names = mesh.mesh_dim_names or ()
    return all(mesh.get_local_rank(name) == 0 for name, p in zip(names, tensor.placements) if isinstance(p, Replicate))


@torch.no_grad()
def assemble_full(tensor: torch.Tensor) -> torch.Tensor:
    """The unsharded value on every rank of the tensor's mesh (a collective): each piece
    written by one of its holders into zeros, then summed (x + 0 is exact)."""
    if not isinstance(tensor, DTensor):
        return tensor
    mesh, local = tensor.device_mesh, tensor.to_local()
    full = torch.zeros(tensor.shape, dtype=local.dtype, device=local.device)
    if writes_pieces(tensor):
        for piece in local_pieces(tensor):
            into, source = _windows(piece)
            full[into] = local[source]
    group = mesh.get_group() if mesh.ndim == 1 else None  # the trainer's 2-D mesh is the world
    if group is None and mesh.size() != dist.get_world_size():
        raise ValueError(f"a {mesh.ndim}-D mesh of {mesh.size()} ranks in a world of {dist.get_world_size()}")
    dist.all_reduce(full, group=group)
    return full


@torch.no_grad()
def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Set `target` (a DTensor or plain tensor) from the full value every rank holds: each
    rank copies its own pieces (no communication)."""
    if not isinstance(target, DTensor):
        target.copy_(full.to(target.device, target.dtype))
        return
    local = target.to_local()
    for piece in local_pieces(target):
        into, source = _windows(piece)
        local[source].copy_(full[into].to(local.device, local.dtype))
