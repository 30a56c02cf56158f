"""Bias + GELU (tanh approximation), forward and backward, fused in Triton.

BLOOM's MLP computes gelu(x @ W1 + b1). Fusing the bias add into the activation saves one
read and one write of the (tokens, 4 * hidden) activation each way. The backward
recomputes gelu'(x + b) from the saved pre-activation. For dbias it runs as a persistent
reduction: each program owns a column block and a contiguous run of rows, accumulates in a
(ROWS, BLOCK_F) fp32 register tile, sums it over rows once at the end and writes one
partial row; a second small kernel adds the few dozen partial rows in a fixed order and
writes bias's dtype (deterministic, no atomics).

References: Megatron-LM `fused_bias_gelu.py` (the same tanh formula), Liger-Kernel
`ops/geglu.py`, Triton tutorial 05 (per-program partial sums for a column reduction).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from bloomrun.kernels._launch import check_last_dim_contiguous, num_programs_for

# The GELU constants sqrt(2/pi) and 0.044715 are spelled as literals inside the kernels:
# compiled Triton refuses float globals in @triton.jit code (the interpreter accepts them,
# so only a GPU run catches it).

# Launch shapes are chosen by rule, not autotuned. Both kernels stream (M, F) tensors and
# are memory-bound: a tile of 4096 values at 8 warps is 16 fp32 values per thread per live
# tensor (two 16-byte bf16 loads), enough bytes in flight per SM without spilling. The
# autotuned list this replaces had 32 x 1024 tiles at 4 warps (256 values per thread per
# tensor; ptxas for sm_90a: 2.7 KB of spill stores in GELU's backward, 18.7 KB in SwiGLU's)
# and cost Python on every call; a rule also needs no tuning sweep at start-up. ptxas at
# F 8192 bf16 for this rule (4 x 1024 tiles, 8 warps): forward 34 registers, backward 80,
# no spills.
_TILE_VALUES = 4096
_MAX_BLOCK_F = 1024
_VALUES_PER_THREAD = 16
# Persistent backward programs per SM: as many as are resident at once, so all run in one
# wave and each SM keeps the most loads in flight (nothing pipelines loads across loop steps
# here). ptxas (sm_90a, F 8192 bf16): 80 registers x 256 threads, so three fit in 64K.
_BACKWARD_PROGRAMS_PER_SM = 3
# The partial-row reduction: 32 partial rows x 64 columns per step (256 contiguous bytes).
_REDUCE_ROWS, _REDUCE_BLOCK, _REDUCE_WARPS = 32, 64, 4


class Tile(NamedTuple):
    rows: int
    block_f: int
    num_warps: int


@functools.lru_cache(maxsize=None)
def tile_for(n_cols: int) -> Tile:
    """The (rows, columns, warps) of one tile for an activation `n_cols` wide."""
    block_f = min(_MAX_BLOCK_F, triton.next_power_of_2(n_cols))
    rows = max(1, _TILE_VALUES // block_f)
    return Tile(rows, block_f, max(1, rows * block_f // (32 * _VALUES_PER_THREAD)))


class RowGroups(NamedTuple):
    count: int  # programs along the rows: partial rows of dbias
    tiles_each: int  # row tiles per group (the last group may have fewer)


def row_groups(n_row_tiles: int, n_col_blocks: int, num_programs: int) -> RowGroups:
    """Splits the row tiles into contiguous runs so groups x column blocks ~ num_programs."""
    wanted = max(1, min(n_row_tiles, triton.cdiv(num_programs, n_col_blocks)))
    tiles_each = max(1, triton.cdiv(n_row_tiles, wanted))
    return RowGroups(max(1, triton.cdiv(n_row_tiles, tiles_each)), tiles_each)


@triton.jit
def _tanh(u):
    # tanh through sigmoid: tl has no tanh that also runs under the interpreter.
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _bias_gelu_forward_kernel(
    Y,  # (M, F) output, contiguous
    X,  # (M, F), row stride stride_x
    Bias,  # (F,)
    stride_x,
    n_rows,
    n_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Bias + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    h = x + b[None, :]
    t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
    y = 0.5 * h * (1.0 + t)
    tl.store(Y + rows[:, None] * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_backward_kernel(
    DX,  # (M, F) output, contiguous
    DBias_partial,  # (G, F) fp32, one row per row group
    DY,  # (M, F), row stride stride_dy
    X,  # (M, F), row stride stride_x
    Bias,  # (F,)
    stride_dy,
    stride_x,
    n_rows,
    n_cols,
    tiles_per_group,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    # Program (g, j): row tiles [g * tiles_per_group, ...) of column block j. dbias stays a
    # (BLOCK_M, BLOCK_F) register tile until the loop ends: one cross-row sum per program.
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = cols < n_cols
    b = tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
    dbias = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    first_tile = group * tiles_per_group
    last_tile = tl.minimum(first_tile + tiles_per_group, tl.cdiv(n_rows, BLOCK_M))
    for row_tile in range(first_tile, last_tile):
        rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = x + b[None, :]
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        dt_dh = (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
        dx = dy * (0.5 * (1.0 + t) + 0.5 * h * dt_dh)  # 0 where masked: dy loaded as 0
        tl.store(DX + rows[:, None] * n_cols + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dbias += dx
    tl.store(DBias_partial + group * n_cols + cols, tl.sum(dbias, axis=0), mask=col_ok)


@triton.jit
def _sum_partial_rows_kernel(
    Out,  # (N,) output, any float dtype
    Partial,  # (P, N) fp32, contiguous
    n_partial,  # P
    n_cols,  # N
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Column block per program; the partial rows are added in a fixed order (deterministic).
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for start in range(0, n_partial, ROWS):
        rows = start + tl.arange(0, ROWS)
        mask = (rows < n_partial)[:, None] & col_ok[None, :]
        acc += tl.load(Partial + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=col_ok)


def sum_partial_rows(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """partial.sum(0).to(dtype) for a contiguous (P, N) fp32 tensor, in one launch."""
    n_partial, n_cols = partial.shape
    out = torch.empty(n_cols, dtype=dtype, device=partial.device)
    _sum_partial_rows_kernel[(triton.cdiv(n_cols, _REDUCE_BLOCK),)](
        out, partial, n_partial, n_cols, ROWS=_REDUCE_ROWS, BLOCK=_REDUCE_BLOCK, num_warps=_REDUCE_WARPS,
    )
    return out


def _as_rows(name, x, width):
    check_last_dim_contiguous(name, x)
    if x.shape[-1] != width:
        raise ValueError(f"{name} last dimension must be {width}, got {x.shape[-1]}")
    return x.reshape(-1, width)


def bias_gelu_forward(x, bias):
    x2 = _as_rows("bias_gelu input", x, bias.shape[0])
    n_rows, n_cols = x2.shape
    tile = tile_for(n_cols)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous: no .view() per call
    grid = (triton.cdiv(n_rows, tile.rows), triton.cdiv(n_cols, tile.block_f))
    _bias_gelu_forward_kernel[grid](
        y, x2, bias, x2.stride(0), n_rows, n_cols,
        BLOCK_M=tile.rows, BLOCK_F=tile.block_f, num_warps=tile.num_warps,
    )
    return y


def bias_gelu_backward(dy, x, bias):
    """Returns (dx, dbias)."""
    x2 = _as_rows("bias_gelu input", x, bias.shape[0])
    if dy.shape != x.shape:  # the kernel reads dy with x's rows: a mismatch would read out of bounds
        raise ValueError(f"bias_gelu grad must have the input's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    dy = dy.contiguous()  # row stride n_cols
    n_rows, n_cols = x2.shape
    tile = tile_for(n_cols)
    n_col_blocks = triton.cdiv(n_cols, tile.block_f)
    groups = row_groups(triton.cdiv(n_rows, tile.rows), n_col_blocks, num_programs_for(x, _BACKWARD_PROGRAMS_PER_SM))
    device = x.device
    dx = torch.empty(x.shape, dtype=x.dtype, device=device)
    dbias_partial = torch.empty(groups.count, n_cols, dtype=torch.float32, device=device)
    _bias_gelu_backward_kernel[(groups.count, n_col_blocks)](
        dx, dbias_partial, dy, x2, bias, n_cols, x2.stride(0), n_rows, n_cols, groups.tiles_each,
        BLOCK_M=tile.rows, BLOCK_F=tile.block_f, num_warps=tile.num_warps,
    )
    return dx, sum_partial_rows(dbias_partial, bias.dtype)


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return bias_gelu_forward(x, bias)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        return bias_gelu_backward(dy, x, bias)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x + bias) for x (..., F), bias (F,); the result has x's dtype."""
    return BiasGeluFunction.apply(x, bias)


def bias_gelu_reference(x, bias):
    """Plain torch, computed in fp32 and cast back to x's dtype."""
    h = x.float() + bias.float()
    return torch.nn.functional.gelu(h, approximate="tanh").to(x.dtype)
