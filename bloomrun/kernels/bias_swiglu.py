"""Bias + SwiGLU, forward and backward, fused in Triton (the paper's activation ablation).

The MLP's first projection produces (..., 2F); with its bias added, the first half is
the gate a and the second half the value g: out = silu(a) * g, shape (..., F). The fused
kernel reads the (..., 2F) input once and writes (..., F); the backward writes d(x) for
both halves and, as bias-GELU's backward does, sums dbias as a persistent reduction: each
program owns a column block and a run of rows, accumulates both halves in fp32 register
tiles, writes one partial row, and _launch.sum_partial_rows adds those in one launch.

References: Shazeer, "GLU Variants Improve Transformer" (2020); Liger-Kernel `ops/swiglu.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bloomrun.kernels._launch import (
    check_last_dim_contiguous,
    last_dim_contiguous,
    num_programs_for,
    row_groups,
    sum_partial_rows,
    tile_for,
)

# Launch shapes: _launch.tile_for's rule (4096-value tiles, 16 fp32 values per thread per
# live tensor, no autotuner) applied to the half width F. Persistent backward programs per
# SM: as many as are resident at once; ptxas (sm_90a, F 5440 bf16): 127 registers x 256
# threads, so two.
_BACKWARD_PROGRAMS_PER_SM = 2


@triton.jit
def _load_gate_and_up(X, Bias, rows, cols, stride_x, half, mask, col_ok):
    """The gate half a and the up half g of x + bias for a tile, in fp32 (both kernels)."""
    gate_ptrs = X + rows[:, None] * stride_x + cols[None, :]
    a = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptrs + half, mask=mask, other=0.0).to(tl.float32)
    a += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    g += tl.load(Bias + half + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return a, g


@triton.jit
def _bias_swiglu_forward_kernel(
    Y,  # (M, F) output, contiguous
    X,  # (M, 2F), row stride stride_x
    Bias,  # (2F,)
    stride_x,
    n_rows,
    half,  # F
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = cols < half
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    a, g = _load_gate_and_up(X, Bias, rows, cols, stride_x, half, mask, col_ok)
    y = a * tl.sigmoid(a) * g
    tl.store(Y + rows[:, None] * half + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_swiglu_backward_kernel(
    DX,  # (M, 2F) output, contiguous
    DBias_partial,  # (G, 2F) fp32, one row per row group
    DY,  # (M, F), row stride stride_dy
    X,  # (M, 2F), row stride stride_x
    Bias,  # (2F,)
    stride_dy,
    stride_x,
    n_rows,
    half,
    tiles_per_group,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    # Program (g, j): row tiles [g * tiles_per_group, ...) of column block j of both halves;
    # the dbias tiles are summed over rows once, after the loop.
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = cols < half
    da_sum = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    dg_sum = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    first_tile = group * tiles_per_group
    last_tile = tl.minimum(first_tile + tiles_per_group, tl.cdiv(n_rows, BLOCK_M))
    for row_tile in range(first_tile, last_tile):
        rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        a, g = _load_gate_and_up(X, Bias, rows, cols, stride_x, half, mask, col_ok)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        # Both are 0 where masked: dy is loaded as 0 there.
        da = dy * g * s * (1.0 + a * (1.0 - s))
        dg = dy * a * s
        out = DX + rows[:, None] * (2 * half) + cols[None, :]
        tl.store(out, da.to(DX.dtype.element_ty), mask=mask)
        tl.store(out + half, dg.to(DX.dtype.element_ty), mask=mask)
        da_sum += da
        dg_sum += dg
    partial = DBias_partial + group * (2 * half) + cols
    tl.store(partial, tl.sum(da_sum, axis=0), mask=col_ok)
    tl.store(partial + half, tl.sum(dg_sum, axis=0), mask=col_ok)


def _as_rows(x, bias):
    check_last_dim_contiguous("bias_swiglu input", x)
    width = x.shape[-1]
    if width % 2 or bias.shape != (width,):
        raise ValueError(f"bias_swiglu needs an even last dimension and bias ({width},), got {tuple(x.shape)}, {tuple(bias.shape)}")
    return x.reshape(-1, width)


def bias_swiglu_forward(x, bias):
    x2 = _as_rows(x, bias)
    n_rows, half = x2.shape[0], x2.shape[1] // 2
    tile = tile_for(half)
    y = torch.empty(*x.shape[:-1], half, dtype=x.dtype, device=x.device)  # no .view() per call
    grid = (triton.cdiv(n_rows, tile.rows), triton.cdiv(half, tile.block_f))
    _bias_swiglu_forward_kernel[grid](
        y, x2, bias, x2.stride(0), n_rows, half,
        BLOCK_M=tile.rows, BLOCK_F=tile.block_f, num_warps=tile.num_warps,
    )
    return y


def bias_swiglu_backward(dy, x, bias):
    """Returns (dx, dbias)."""
    x2 = _as_rows(x, bias)
    n_rows, half = x2.shape[0], x2.shape[1] // 2
    if dy.shape != (*x.shape[:-1], half):  # a mismatch would read out of bounds
        raise ValueError(f"bias_swiglu grad must be {(*x.shape[:-1], half)}, got {tuple(dy.shape)}")
    dy = dy.contiguous()  # row stride half
    tile = tile_for(half)
    n_col_blocks = triton.cdiv(half, tile.block_f)
    groups = row_groups(triton.cdiv(n_rows, tile.rows), n_col_blocks, num_programs_for(x, _BACKWARD_PROGRAMS_PER_SM))
    device = x.device
    dx = torch.empty(x.shape, dtype=x.dtype, device=device)
    dbias_partial = torch.empty(groups.count, 2 * half, dtype=torch.float32, device=device)
    _bias_swiglu_backward_kernel[(groups.count, n_col_blocks)](
        dx, dbias_partial, dy, x2, bias, half, x2.stride(0), n_rows, half, groups.tiles_each,
        BLOCK_M=tile.rows, BLOCK_F=tile.block_f, num_warps=tile.num_warps,
    )
    (dbias,) = sum_partial_rows(bias.dtype, dbias_partial)
    return dx, dbias


class BiasSwigluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return bias_swiglu_forward(x, bias)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        return bias_swiglu_backward(dy, x, bias)


def bias_swiglu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """silu(a) * g where (a, g) = (x + bias).chunk(2, -1); x (..., 2F) -> (..., F)."""
    return BiasSwigluFunction.apply(x, bias)


# ---------------------------------------------------------------------- as torch custom ops


@torch.library.custom_op("bloomrun::bias_swiglu_forward", mutates_args=())
def _bias_swiglu_forward_op(x: Tensor, bias: Tensor) -> Tensor:
    """x (..., 2F) -> (..., F)."""
    return bias_swiglu_forward(last_dim_contiguous(x), bias)


@_bias_swiglu_forward_op.register_fake
def _(x, bias):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.custom_op("bloomrun::bias_swiglu_backward", mutates_args=())
def _bias_swiglu_backward_op(dy: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dbias)."""
    return bias_swiglu_backward(dy, last_dim_contiguous(x), bias)


@_bias_swiglu_backward_op.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _save_x_and_bias(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bias_swiglu_op_grad(ctx, dy):
    return _bias_swiglu_backward_op(dy, *ctx.saved_tensors)


_bias_swiglu_forward_op.register_autograd(_bias_swiglu_op_grad, setup_context=_save_x_and_bias)


def bias_swiglu_custom_op(x: Tensor, bias: Tensor) -> Tensor:
    """`bias_swiglu` as torch.ops.bloomrun.bias_swiglu_forward/_backward, for torch.compile."""
    return _bias_swiglu_forward_op(x, bias)


def bias_swiglu_reference(x, bias):
    """Plain torch, computed in fp32 and cast back to x's dtype."""
    a, g = (x.float() + bias.float()).chunk(2, dim=-1)
    return (torch.nn.functional.silu(a) * g).to(x.dtype)
