"""The Triton kernels as torch custom ops (namespace `bloomrun`), for torch.compile.

Dynamo cannot trace into a Triton launch or an autograd.Function that launches one without
breaking the graph, and each break stops Inductor from fusing the glue between kernels
(residual adds, bias adds, casts). A custom op is one opaque node instead: `register_fake`
gives its output shapes, dtypes and strides, so tracing never runs a kernel, and
`register_autograd` pairs each forward op with a backward op, which is opaque as well.

The functions at the bottom (`layer_norm`, `attention`, ...) have the signatures of
`bloomrun.kernels`' public API; ops.py calls them while compiling. Eager runs keep the
autograd.Function path: custom-op dispatch costs host time on every call, and the
memory-bound kernels are already launch-bound (BENCHMARKS.md).

Every fake returns the strides the host function really returns (new contiguous tensors), so
compiled code never sees a layout the fake did not promise.
References: torch docs "Custom Python Operators" (torch.library.custom_op).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bloomrun.kernels.attention import attention_backward as host_attention_backward
from bloomrun.kernels.attention import attention_forward as host_attention_forward
from bloomrun.kernels.bias_gelu import bias_gelu_backward as host_bias_gelu_backward
from bloomrun.kernels.bias_gelu import bias_gelu_forward as host_bias_gelu_forward
from bloomrun.kernels.bias_swiglu import bias_swiglu_backward as host_bias_swiglu_backward
from bloomrun.kernels.bias_swiglu import bias_swiglu_forward as host_bias_swiglu_forward
from bloomrun.kernels.cross_entropy import autocast_operands
from bloomrun.kernels.cross_entropy import linear_cross_entropy_forward as host_linear_cross_entropy_forward
from bloomrun.kernels.layer_norm import layer_norm_backward as host_layer_norm_backward
from bloomrun.kernels.layer_norm import layer_norm_forward as host_layer_norm_forward
from bloomrun.kernels.rotary import rotary_forward as host_rotary_forward


def last_dim_contiguous(t: Tensor) -> Tensor:
    """The kernels need stride 1 in the last dimension and accept any other strides.

    Inductor passes custom ops the strides seen while tracing by default (the
    `needs_exact_strides` layout constraint), so this copies nothing in practice; it keeps a
    layout another torch version or a gradient might choose from reaching a kernel's check.
    """
    return t if t.stride(-1) == 1 else t.contiguous()


def _rows(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


# ---------------------------------------------------------------------- LayerNorm


@torch.library.custom_op("bloomrun::layer_norm_forward", mutates_args=())
def layer_norm_forward(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): y like x (in `out_dtype` if given), mean and rstd (rows,) fp32."""
    return host_layer_norm_forward(last_dim_contiguous(x), weight, bias, eps, out_dtype)


@layer_norm_forward.register_fake
def _(x, weight, bias, eps, out_dtype):
    stats = x.new_empty(_rows(x), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("bloomrun::layer_norm_backward", mutates_args=())
def layer_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias)."""
    return host_layer_norm_backward(last_dim_contiguous(dy), last_dim_contiguous(x), weight, mean, rstd)


@layer_norm_backward.register_fake
def _(dy, x, weight, mean, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, _bias, _eps, _out_dtype = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = layer_norm_backward(dy, x, weight, mean, rstd)
    return dx, dweight, dbias, None, None


layer_norm_forward.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


# ---------------------------------------------------------------------- bias + GELU


@torch.library.custom_op("bloomrun::bias_gelu_forward", mutates_args=())
def bias_gelu_forward(x: Tensor, bias: Tensor) -> Tensor:
    return host_bias_gelu_forward(last_dim_contiguous(x), bias)


@bias_gelu_forward.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("bloomrun::bias_gelu_backward", mutates_args=())
def bias_gelu_backward(dy: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dbias)."""
    return host_bias_gelu_backward(dy, last_dim_contiguous(x), bias)


@bias_gelu_backward.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _save_x_and_bias(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bias_gelu_backward(ctx, dy):
    return bias_gelu_backward(dy, *ctx.saved_tensors)


bias_gelu_forward.register_autograd(_bias_gelu_backward, setup_context=_save_x_and_bias)


# ---------------------------------------------------------------------- bias + SwiGLU


@torch.library.custom_op("bloomrun::bias_swiglu_forward", mutates_args=())
def bias_swiglu_forward(x: Tensor, bias: Tensor) -> Tensor:
    """x (..., 2F) -> (..., F)."""
    return host_bias_swiglu_forward(last_dim_contiguous(x), bias)


@bias_swiglu_forward.register_fake
def _(x, bias):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.custom_op("bloomrun::bias_swiglu_backward", mutates_args=())
def bias_swiglu_backward(dy: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dbias)."""
    return host_bias_swiglu_backward(dy, last_dim_contiguous(x), bias)


@bias_swiglu_backward.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _bias_swiglu_backward(ctx, dy):
    return bias_swiglu_backward(dy, *ctx.saved_tensors)


bias_swiglu_forward.register_autograd(_bias_swiglu_backward, setup_context=_save_x_and_bias)


# ---------------------------------------------------------------------- attention


@torch.library.custom_op("bloomrun::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Tensor | None) -> tuple[Tensor, Tensor]:
    """(o, lse): o (B, T, H, D) contiguous, lse (B * H, T) fp32; q, k, v may be strided views."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return host_attention_forward(q, k, v, alibi_slopes)


@attention_forward.register_fake
def _(q, k, v, alibi_slopes):
    batch, seq_len, num_heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(batch * num_heads, seq_len, dtype=torch.float32)


@torch.library.custom_op("bloomrun::attention_backward", mutates_args=())
def attention_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, alibi_slopes: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), each (B, T, H, D) contiguous."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return host_attention_backward(do, q, k, v, o, lse, alibi_slopes)


@attention_backward.register_fake
def _(do, q, k, v, o, lse, alibi_slopes):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, alibi_slopes = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, alibi_slopes)
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, do, _dlse):
    dq, dk, dv = attention_backward(do, *ctx.saved_tensors)
    return dq, dk, dv, None


attention_forward.register_autograd(_attention_backward, setup_context=_attention_setup)


# ---------------------------------------------------------------------- rotary


@torch.library.custom_op("bloomrun::rotary", mutates_args=())
def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    """(q_out, k_out), new contiguous (B, T, H, D); `inverse` rotates by minus the angles."""
    return host_rotary_forward(last_dim_contiguous(q), last_dim_contiguous(k), cos, sin, inverse)


@rotary.register_fake
def _(q, k, cos, sin, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rotary_setup(ctx, inputs, output):
    _q, _k, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _rotary_backward(ctx, dq_out, dk_out):
    # A rotation's transpose is the rotation by minus the angles: the same op, inverted.
    cos, sin = ctx.saved_tensors
    dq, dk = rotary(dq_out, dk_out, cos, sin, not ctx.inverse)
    return dq, dk, None, None, None


rotary.register_autograd(_rotary_backward, setup_context=_rotary_setup)


# ---------------------------------------------------------------------- linear + cross-entropy


@torch.library.custom_op("bloomrun::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, need_d_hidden: bool, need_d_weight: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, d_hidden, d_weight) with the gradients of the mean loss; a gradient not
    needed comes back as an empty (0,) tensor and costs nothing.

    The host function decides what to compute from `requires_grad`, which is always False
    inside an op (autograd has been handled above it), hence the two flags.
    """
    # Grad mode off: the host function's `matmul(out=...)` refuses inputs that require grad.
    # Autocast off: the caller has cast both operands already, as the eager path does.
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        loss, d_hidden, d_weight = host_linear_cross_entropy_forward(
            hidden.detach().requires_grad_(need_d_hidden), weight.detach().requires_grad_(need_d_weight),
            targets, ignore_index,
        )
    return loss, _or_empty(d_hidden, hidden), _or_empty(d_weight, weight)


def _or_empty(grad: Tensor | None, like: Tensor) -> Tensor:
    return grad if grad is not None else like.new_empty(0)


@linear_cross_entropy_forward.register_fake
def _(hidden, weight, targets, ignore_index, need_d_hidden, need_d_weight):
    loss = hidden.new_empty((), dtype=torch.float32)
    d_hidden = torch.empty_like(hidden) if need_d_hidden else hidden.new_empty(0)
    d_weight = torch.empty_like(weight) if need_d_weight else weight.new_empty(0)
    return loss, d_hidden, d_weight


def _linear_cross_entropy_setup(ctx, inputs, output):
    _loss, d_hidden, d_weight = output
    ctx.save_for_backward(d_hidden, d_weight)
    ctx.need = inputs[4:6]
    ctx.mark_non_differentiable(d_hidden, d_weight)


def _linear_cross_entropy_backward(ctx, d_loss, _dd_hidden, _dd_weight):
    # Out of place (eager scales in place): in a compiled graph Inductor fuses this multiply
    # with what consumes the gradient, such as autocast's cast back to the fp32 weight.
    d_hidden, d_weight = ctx.saved_tensors
    need_d_hidden, need_d_weight = ctx.need
    return (
        d_hidden * d_loss.to(d_hidden.dtype) if need_d_hidden else None,
        d_weight * d_loss.to(d_weight.dtype) if need_d_weight else None,
        None, None, None, None,
    )


linear_cross_entropy_forward.register_autograd(_linear_cross_entropy_backward, setup_context=_linear_cross_entropy_setup)


# ---------------------------------------------------------------------- the public API, as ops


def layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> Tensor:
    return layer_norm_forward(x, weight, bias, eps, out_dtype)[0]


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    return bias_gelu_forward(x, bias)


def bias_swiglu(x: Tensor, bias: Tensor) -> Tensor:
    return bias_swiglu_forward(x, bias)


def attention(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Tensor | None = None) -> Tensor:
    return attention_forward(q, k, v, alibi_slopes)[0]


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return rotary(q, k, cos, sin, False)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """As `bloomrun.kernels.linear_cross_entropy`: operands cast to the autocast dtype first."""
    hidden, weight = autocast_operands(hidden, weight)
    grad = torch.is_grad_enabled()
    loss, _, _ = linear_cross_entropy_forward(
        hidden, weight, targets, ignore_index, grad and hidden.requires_grad, grad and weight.requires_grad
    )
    return loss
