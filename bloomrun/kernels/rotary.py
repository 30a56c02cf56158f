"""Rotary position embedding applied to q and k in one fused kernel (the position ablation).

Convention: the rotate-half form of GPT-NeoX and Hugging Face Llama. With x1, x2 the first
and second halves of a head's D features and cos, sin of shape (T, D/2) (one angle per
feature pair, not duplicated to D):
    out1 = x1 * cos - x2 * sin,    out2 = x2 * cos + x1 * sin.
The backward is the inverse rotation, the same kernel with sin negated. q and k may be
strided views of the fused QKV buffer; one program rotates every head of q and k at one
(batch, position), so cos and sin are loaded once for both.

References: Su et al., "RoFormer" (2021); Liger-Kernel `ops/rope.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bloomrun.kernels._launch import check_last_dim_contiguous, last_dim_contiguous


@triton.jit
def _rotate_heads(Out, X, cos, sin, stride_xh, stride_oh, num_heads, half,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads < num_heads)[:, None] & (cols < half)[None, :]
    x_ptrs = X + heads[:, None] * stride_xh + cols[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + half, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = Out + heads[:, None] * stride_oh + cols[None, :]
    tl.store(out_ptrs, (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=mask)
    tl.store(out_ptrs + half, (x2 * cos + x1 * sin).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    QOut, KOut,  # (B, T, H, D) outputs, contiguous
    Q, K,  # (B, T, H, D), strided; last dim contiguous
    Cos, Sin,  # (T, D/2), contiguous
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    seq_len, num_heads, half,
    INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * T + t
    b = row // seq_len
    t = row % seq_len
    cols = tl.arange(0, BLOCK_HALF)
    cos = tl.load(Cos + t * half + cols, mask=cols < half, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(Sin + t * half + cols, mask=cols < half, other=0.0).to(tl.float32)[None, :]
    if INVERSE:
        sin = -sin
    out_offset = row * num_heads * 2 * half
    _rotate_heads(QOut + out_offset, Q + b * stride_qb + t * stride_qt, cos, sin, stride_qh, 2 * half,
                  num_heads, half, BLOCK_H, BLOCK_HALF)
    _rotate_heads(KOut + out_offset, K + b * stride_kb + t * stride_kt, cos, sin, stride_kh, 2 * half,
                  num_heads, half, BLOCK_H, BLOCK_HALF)


def rotary_forward(q, k, cos, sin, inverse=False):
    """Rotates q and k (B, T, H, D); returns new contiguous tensors."""
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"apply_rotary wants q and k of one shape (B, T, H, D), got {q.shape}, {k.shape}")
    batch, seq_len, num_heads, head_dim = q.shape
    if head_dim % 2 or cos.shape != (seq_len, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(
            f"apply_rotary wants cos and sin of shape (T, D/2) = ({seq_len}, {head_dim // 2}), "
            f"got {tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    check_last_dim_contiguous("q", q)
    check_last_dim_contiguous("k", k)
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    _rotary_kernel[(batch * seq_len,)](
        q_out, k_out, q, k, cos, sin,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        seq_len, num_heads, half,
        INVERSE=inverse, BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_HALF=block_half,
        num_warps=4 if num_heads * block_half >= 1024 else 1,
    )
    return q_out, k_out


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotary_forward(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = rotary_forward(dq_out.contiguous(), dk_out.contiguous(), cos, sin, inverse=True)
        return dq, dk, None, None


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(q_rot, k_rot) for q, k (B, T, H, D) and cos, sin (T, D/2); rotate-half convention."""
    return RotaryFunction.apply(q, k, cos, sin)


# ---------------------------------------------------------------------- as a torch custom op


@torch.library.custom_op("bloomrun::rotary", mutates_args=())
def _rotary_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    """(q_out, k_out), new contiguous (B, T, H, D); `inverse` rotates by minus the angles."""
    return rotary_forward(last_dim_contiguous(q), last_dim_contiguous(k), cos, sin, inverse)


@_rotary_op.register_fake
def _(q, k, cos, sin, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rotary_op_setup(ctx, inputs, output):
    _q, _k, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _rotary_op_grad(ctx, dq_out, dk_out):
    # A rotation's transpose is the rotation by minus the angles: the same op, inverted.
    cos, sin = ctx.saved_tensors
    dq, dk = _rotary_op(dq_out, dk_out, cos, sin, not ctx.inverse)
    return dq, dk, None, None, None


_rotary_op.register_autograd(_rotary_op_grad, setup_context=_rotary_op_setup)


def apply_rotary_custom_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """`apply_rotary` as torch.ops.bloomrun.rotary, for torch.compile."""
    return _rotary_op(q, k, cos, sin, False)


def rotary_reference(q, k, cos, sin):
    """Plain torch in fp32, cast back to the inputs' dtype."""

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        c, s = cos.float()[None, :, None, :], sin.float()[None, :, None, :]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)

