"""LayerNorm over the last dimension, forward and backward, fused in Triton.

Used for every LayerNorm of the BLOOM block and for the embedding LayerNorm. The forward
reads x once and writes y plus one (mean, rstd) pair per row; the backward recomputes the
normalised input from them instead of saving it. dW and dB are summed per persistent
program into a (programs, C) fp32 buffer and reduced by torch afterwards: no atomics, so the
result is deterministic.

References: Triton tutorial 05 (layer-norm), Liger-Kernel `ops/layer_norm.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bloomrun.kernels._launch import check_last_dim_contiguous, num_programs_for, pick_configs


def _row_configs() -> list[triton.Config]:
    tuned = [
        triton.Config({"ROWS": rows}, num_warps=warps)
        for rows in (1, 2, 4)
        for warps in (4, 8, 16)
    ]
    tuned.sort(key=lambda c: (c.kwargs["ROWS"] != 2, c.num_warps != 8))  # (2, 8) first: the default
    return pick_configs(tuned, triton.Config({"ROWS": 16}, num_warps=1))


@triton.autotune(configs=_row_configs(), key=["n_cols"])
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


@triton.autotune(configs=_row_configs(), key=["n_cols"])
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
    # share of dW and dB in registers until the end.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK,), dtype=tl.float32)
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
        dw_acc += tl.sum(dy * x_hat, axis=0)
        db_acc += tl.sum(dy, axis=0)
    tl.store(DW_partial + pid * n_cols + cols, dw_acc, mask=col_ok)
    tl.store(DB_partial + pid * n_cols + cols, db_acc, mask=col_ok)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    check_last_dim_contiguous("layer_norm input", x)
    return x.reshape(-1, x.shape[-1])


def layer_norm_forward(x, weight, bias, eps):
    """Returns (y, mean, rstd); y has x's shape and dtype."""
    if weight.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise ValueError(f"layer_norm weight/bias must be ({x.shape[-1]},), got {tuple(weight.shape)}, {tuple(bias.shape)}")
    x2 = _as_rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty_like(x2)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)
    _layer_norm_forward_kernel[grid](
        y, x2, weight, bias, mean, rstd, x2.stride(0), y.stride(0), n_rows, n_cols, eps,
        BLOCK=triton.next_power_of_2(n_cols),
    )
    return y.view(x.shape), mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd):
    """Returns (dx, dweight, dbias)."""
    x2 = _as_rows(x)
    dy2 = dy.reshape(x2.shape) if dy.stride(-1) == 1 else dy.contiguous().reshape(x2.shape)
    n_rows, n_cols = x2.shape
    num_programs = max(1, min(num_programs_for(x, per_sm=4), n_rows))
    dx = torch.empty_like(x2)
    dw_partial = torch.empty(num_programs, n_cols, dtype=torch.float32, device=x.device)
    db_partial = torch.empty(num_programs, n_cols, dtype=torch.float32, device=x.device)
    _layer_norm_backward_kernel[(num_programs,)](
        dx, dw_partial, db_partial, dy2, x2, weight, mean, rstd,
        dx.stride(0), dy2.stride(0), x2.stride(0), n_rows, n_cols,
        BLOCK=triton.next_power_of_2(n_cols),
    )
    dweight = dw_partial.sum(0).to(weight.dtype)
    dbias = db_partial.sum(0).to(weight.dtype)
    return dx.view(x.shape), dweight, dbias


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = layer_norm_forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = layer_norm_backward(dy, x, weight, mean, rstd)
        return dx, dweight, dbias, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension of x (any leading shape); y in x's dtype."""
    return LayerNormFunction.apply(x, weight, bias, eps)


def layer_norm_reference(x, weight, bias, eps=1e-5):
    """Plain torch, computed in fp32 and cast back to x's dtype."""
    y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(x.dtype)
