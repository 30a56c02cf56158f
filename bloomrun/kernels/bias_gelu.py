"""Bias + GELU (tanh approximation), forward and backward, fused in Triton.

BLOOM's MLP computes gelu(x @ W1 + b1). Fusing the bias add into the activation saves one
read and one write of the (tokens, 4 * hidden) activation each way. The backward
recomputes gelu'(x + b) from the saved pre-activation, and each program sums its tile's
columns into a (row tiles, F) fp32 buffer for dbias, reduced by torch afterwards.

References: Megatron-LM `fused_bias_gelu.py` (the same tanh formula), Liger-Kernel
`ops/geglu.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bloomrun.kernels._launch import check_last_dim_contiguous, interpreting, pick_configs

# The GELU constants sqrt(2/pi) and 0.044715 are spelled as literals inside the kernels:
# compiled Triton refuses float globals in @triton.jit code (the interpreter accepts them,
# so only a GPU run catches it).


def _tile_configs() -> list[triton.Config]:
    tuned = [triton.Config({"BLOCK_F": f}, num_warps=w) for f in (256, 512, 1024) for w in (4, 8)]
    return pick_configs(tuned, triton.Config({"BLOCK_F": 128}, num_warps=1))


def _block_rows() -> int:
    """Rows per tile; fixed per launch so the dbias partial buffer has a known height."""
    return 16 if interpreting() else 32


@triton.jit
def _tanh(u):
    # tanh through sigmoid: tl has no tanh that also runs under the interpreter.
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.autotune(configs=_tile_configs(), key=["n_cols"])
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


@triton.autotune(configs=_tile_configs(), key=["n_cols"])
@triton.jit
def _bias_gelu_backward_kernel(
    DX,  # (M, F) output, contiguous
    DBias_partial,  # (cdiv(M, BLOCK_M), F) fp32
    DY,  # (M, F), row stride stride_dy
    X,  # (M, F), row stride stride_x
    Bias,  # (F,)
    stride_dy,
    stride_x,
    n_rows,
    n_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    row_tile = tl.program_id(0)
    rows = row_tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
    h = x + b[None, :]
    t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
    dt_dh = (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
    dx = dy * (0.5 * (1.0 + t) + 0.5 * h * dt_dh)
    dx = tl.where(mask, dx, 0.0)
    tl.store(DX + rows[:, None] * n_cols + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DBias_partial + row_tile * n_cols + cols, tl.sum(dx, axis=0), mask=col_ok)


def _as_rows(name, x, width):
    check_last_dim_contiguous(name, x)
    if x.shape[-1] != width:
        raise ValueError(f"{name} last dimension must be {width}, got {x.shape[-1]}")
    return x.reshape(-1, width)


def bias_gelu_forward(x, bias):
    x2 = _as_rows("bias_gelu input", x, bias.shape[0])
    n_rows, n_cols = x2.shape
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    block_m = _block_rows()
    grid = lambda meta: (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, meta["BLOCK_F"]))
    _bias_gelu_forward_kernel[grid](y, x2, bias, x2.stride(0), n_rows, n_cols, BLOCK_M=block_m)
    return y.view(x.shape)


def bias_gelu_backward(dy, x, bias):
    """Returns (dx, dbias)."""
    x2 = _as_rows("bias_gelu input", x, bias.shape[0])
    dy2 = dy.contiguous().view(x2.shape)
    n_rows, n_cols = x2.shape
    block_m = _block_rows()
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    dbias_partial = torch.empty(triton.cdiv(n_rows, block_m), n_cols, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, meta["BLOCK_F"]))
    _bias_gelu_backward_kernel[grid](
        dx, dbias_partial, dy2, x2, bias, dy2.stride(0), x2.stride(0), n_rows, n_cols, BLOCK_M=block_m
    )
    return dx.view(x.shape), dbias_partial.sum(0).to(bias.dtype)


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
