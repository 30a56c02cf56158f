"""LayerNorm over the last dimension, forward and backward, fused in Triton.

Used for every LayerNorm of the BLOOM block and for the embedding LayerNorm. The forward
reads x once and writes y plus one (mean, rstd) pair per row; the backward recomputes the
normalised input from them instead of saving it. dW and dB are accumulated per persistent
program in (ROWS, BLOCK) fp32 register tiles, reduced over rows once at the end into one
partial row per program, and a second small kernel (_launch.sum_partial_rows) sums the
partial rows of both in one launch, in a fixed order, writing the parameters' dtype: no
atomics, so the result is deterministic on a given device (the number of programs follows
the SM count).

References: Triton tutorial 05 (layer-norm), Liger-Kernel `ops/layer_norm.py`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from bloomrun.kernels._launch import (
    check_last_dim_contiguous,
    last_dim_contiguous,
    num_programs_for,
    sum_partial_rows,
)

# Launch configurations are chosen by rule, not autotuned, as in Triton's layer-norm
# tutorial. Why: these kernels are memory-bound and their best shape follows from the row's
# size (each program moves a few KB per tensor; each thread holds ~16 fp32 values per live
# tensor, two 16-byte loads in bf16), while the autotuner added Python to every call (its
# key lookup and config kwargs on top of Triton's own launch) for a forward whose bytes take
# ~23 us at 8192 x 2048, and a 9-config sweep at start-up. On the H200 the sweep picked
# (ROWS 1, 4 warps) for the 2048-wide bf16 forward (bench/results/layer_norm.json): what the
# rule gives. ptxas for sm_90a at 2048 bf16 (`triton.compile` on a CPU machine): forward
# 40 registers, backward 106, no spills; at 14336 the backward spills ~300 bytes (16 warps
# cannot hold 32 values per thread for each of its tensors), the forward does not.
_FORWARD_TILE_BYTES = 4096  # one 2048-wide bf16 row per program
# The backward streams x and dy in and dx out and keeps two accumulators: two 2048-wide bf16
# rows per loop step at 8 warps.
_BACKWARD_TILE_BYTES = 8192
_VALUES_PER_THREAD = 16
# Persistent backward programs per SM: as many as fill 16 warps (two 8-warp programs at
# <= 128 registers fit one SM). More would only add partial rows for the second kernel.
_WARPS_PER_SM = 16


class RowTile(NamedTuple):
    block: int  # the row's width padded to a power of two: a whole row per tile
    rows: int  # rows per program (forward) or per loop step (backward)
    num_warps: int


@functools.lru_cache(maxsize=None)
def row_tile(n_cols: int, element_size: int, tile_bytes: int) -> RowTile:
    """The launch shape for rows of `n_cols` elements of `element_size` bytes."""
    block = triton.next_power_of_2(n_cols)
    rows = min(64, max(1, tile_bytes // (block * element_size)))
    num_warps = min(16, max(1, rows * block // (32 * _VALUES_PER_THREAD)))
    return RowTile(block, rows, num_warps)


@triton.jit
def _layer_norm_forward_kernel(
    Y,  # (M, C) output, row stride stride_y
    X,  # (M, C) input, row stride stride_x
    W,  # (C,)
    B,  # (C,)
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    stride_x,
    stride_y,
    n_rows,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rows < n_rows)
    tl.store(Rstd + rows, rstd, mask=rows < n_rows)


@triton.jit
def _layer_norm_backward_kernel(
    DX,  # (M, C) output, row stride stride_dx
    DW_partial,  # (P, C) fp32, one row per program
    DB_partial,  # (P, C) fp32
    DY,  # (M, C), row stride stride_dy
    X,  # (M, C), row stride stride_x
    W,  # (C,)
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    stride_dx,
    stride_dy,
    stride_x,
    n_rows,
    n_cols,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    # Persistent programs: program p handles row blocks p, p + P, p + 2P, ... and keeps its
    # share of dW and dB as (ROWS, BLOCK) register tiles, summed over rows once after the
    # loop: a per-step tl.sum(axis=0) would cross warps (shared memory and a barrier) every
    # step whenever the layout puts rows on different warps.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    db_acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for block in range(pid, tl.cdiv(n_rows, ROWS), num_programs):
        rows = block * ROWS + tl.arange(0, ROWS).to(tl.int64)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(x_hat * wdy, axis=1) / n_cols
        c2 = tl.sum(wdy, axis=1) / n_cols
        dx = (wdy - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * x_hat  # masked elements are 0 in both dy and x_hat
        db_acc += dy
    tl.store(DW_partial + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    tl.store(DB_partial + pid * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_ok)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    check_last_dim_contiguous("layer_norm input", x)
    return x.reshape(-1, x.shape[-1])


def layer_norm_forward(x, weight, bias, eps, out_dtype=None):
    """Returns (y, mean, rstd); y has x's shape and dtype, or `out_dtype` when given."""
    if weight.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise ValueError(f"layer_norm weight/bias must be ({x.shape[-1]},), got {tuple(weight.shape)}, {tuple(bias.shape)}")
    x2 = _as_rows(x)
    n_rows, n_cols = x2.shape
    tile = row_tile(n_cols, x.element_size(), _FORWARD_TILE_BYTES)
    # Outputs are allocated in their final shapes: a .view() per call costs host time.
    device = x.device
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=device)  # contiguous: row stride n_cols
    mean = torch.empty(n_rows, dtype=torch.float32, device=device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=device)
    _layer_norm_forward_kernel[(triton.cdiv(n_rows, tile.rows),)](
        y, x2, weight, bias, mean, rstd, x2.stride(0), n_cols, n_rows, n_cols, eps,
        BLOCK=tile.block, ROWS=tile.rows, num_warps=tile.num_warps,
    )
    return y, mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd):
    """Returns (dx, dweight, dbias)."""
    x2 = _as_rows(x)
    dy2 = dy.reshape(x2.shape) if dy.stride(-1) == 1 else dy.contiguous().reshape(x2.shape)
    n_rows, n_cols = x2.shape
    tile = row_tile(n_cols, x.element_size(), _BACKWARD_TILE_BYTES)
    per_sm = max(1, _WARPS_PER_SM // tile.num_warps)
    num_programs = max(1, min(num_programs_for(x, per_sm=per_sm), triton.cdiv(n_rows, tile.rows)))
    device = x.device
    dx = torch.empty(x.shape, dtype=x.dtype, device=device)  # contiguous: row stride n_cols
    dw_partial = torch.empty(num_programs, n_cols, dtype=torch.float32, device=device)
    db_partial = torch.empty(num_programs, n_cols, dtype=torch.float32, device=device)
    _layer_norm_backward_kernel[(num_programs,)](
        dx, dw_partial, db_partial, dy2, x2, weight, mean, rstd,
        n_cols, dy2.stride(0), x2.stride(0), n_rows, n_cols,
        BLOCK=tile.block, ROWS=tile.rows, num_warps=tile.num_warps,
    )
    dweight, dbias = sum_partial_rows(weight.dtype, dw_partial, db_partial)
    return dx, dweight, dbias


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        y, mean, rstd = layer_norm_forward(x, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = layer_norm_backward(dy, x, weight, mean, rstd)
        return dx, dweight, dbias, None, None


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """LayerNorm over the last dimension of x (any leading shape); y in x's dtype or `out_dtype`.

    `out_dtype` lets a LayerNorm whose output only feeds a matmul write it in the autocast
    dtype directly: under autocast the fp32 residual stream would otherwise be normalised
    into fp32 and then cast by a separate kernel (a write and a read of 4 bytes a value
    more, per LayerNorm, each way). dx stays in x's dtype.
    """
    return LayerNormFunction.apply(x, weight, bias, eps, out_dtype)


# ---------------------------------------------------------------------- as torch custom ops


@torch.library.custom_op("bloomrun::layer_norm_forward", mutates_args=())
def _layer_norm_forward_op(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): y like x (in `out_dtype` if given), mean and rstd (rows,) fp32."""
    return layer_norm_forward(last_dim_contiguous(x), weight, bias, eps, out_dtype)


@_layer_norm_forward_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    stats = x.new_empty(math.prod(x.shape[:-1]), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("bloomrun::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias)."""
    return layer_norm_backward(last_dim_contiguous(dy), last_dim_contiguous(x), weight, mean, rstd)


@_layer_norm_backward_op.register_fake
def _(dy, x, weight, mean, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _layer_norm_op_setup(ctx, inputs, output):
    x, weight, _bias, _eps, _out_dtype = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_op_grad(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _layer_norm_backward_op(dy, x, weight, mean, rstd)
    return dx, dweight, dbias, None, None


_layer_norm_forward_op.register_autograd(_layer_norm_op_grad, setup_context=_layer_norm_op_setup)


def layer_norm_custom_op(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> Tensor:
    """`layer_norm` as torch.ops.bloomrun.layer_norm_forward/_backward, for torch.compile."""
    return _layer_norm_forward_op(x, weight, bias, eps, out_dtype)[0]


def layer_norm_reference(x, weight, bias, eps=1e-5):
    """Plain torch, computed in fp32 and cast back to x's dtype."""
    y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(x.dtype)
