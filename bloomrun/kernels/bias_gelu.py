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

# The GELU constants sqrt(2/pi) and 0.044715 are spelled as literals inside the kernels:
# compiled Triton refuses float globals in @triton.jit code (the interpreter accepts them,
# so only a GPU run catches it).

# Launch shapes: _launch.tile_for's rule (4096-value tiles at 8 warps, no autotuner; the
# evidence is there). Persistent backward programs per SM: as many as are resident at once,
# so all run in one wave and each SM keeps the most loads in flight (nothing pipelines loads
# across loop steps here). ptxas (sm_90a, F 8192 bf16): 80 registers x 256 threads, so three
# fit in 64K.
_BACKWARD_PROGRAMS_PER_SM = 3


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
    (dbias,) = sum_partial_rows(bias.dtype, dbias_partial)
    return dx, dbias


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


# ---------------------------------------------------------------------- as torch custom ops


@torch.library.custom_op("bloomrun::bias_gelu_forward", mutates_args=())
def _bias_gelu_forward_op(x: Tensor, bias: Tensor) -> Tensor:
    return bias_gelu_forward(last_dim_contiguous(x), bias)


@_bias_gelu_forward_op.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("bloomrun::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(dy: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dbias)."""
    return bias_gelu_backward(dy, last_dim_contiguous(x), bias)


@_bias_gelu_backward_op.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _save_x_and_bias(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bias_gelu_op_grad(ctx, dy):
    return _bias_gelu_backward_op(dy, *ctx.saved_tensors)


_bias_gelu_forward_op.register_autograd(_bias_gelu_op_grad, setup_context=_save_x_and_bias)


def bias_gelu_custom_op(x: Tensor, bias: Tensor) -> Tensor:
    """`bias_gelu` as torch.ops.bloomrun.bias_gelu_forward/_backward, for torch.compile."""
    return _bias_gelu_forward_op(x, bias)


def bias_gelu_reference(x, bias):
    """Plain torch, computed in fp32 and cast back to x's dtype."""
    h = x.float() + bias.float()
    return torch.nn.functional.gelu(h, approximate="tanh").to(x.dtype)
