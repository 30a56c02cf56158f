"""The only compute ops the model calls, each with a plain-torch and a Triton implementation.

The functions below are the torch implementations: the numerical reference for parity with
transformers' BloomForCausalLM (fp32 logits within 1e-4) and what runs on the CPU. `TRITON`
holds the same ops from `bloomrun.kernels`, looked up only when called, so CPU-only use never
compiles or even imports a kernel. Which set a model uses is chosen once, from outside it:
`resolve(model.kernels, device)` then `Bloom.use_kernels(...)` (see model/__init__.build_model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "torch")


def triton_op(name: str):
    """`bloomrun.kernels.OPS[name]`, with an error that says how to run without it.

    While torch.compile traces, the op's `custom_op`: there each kernel is a torch custom op,
    one graph node that Inductor fuses around, where the autograd.Function would break the
    graph. Eager runs keep the autograd.Function (`function`), whose dispatch costs less host
    time per call (the small kernels are launch-bound).
    """
    # An import statement, not importlib.import_module: dynamo traces the former only.
    from bloomrun import kernels

    op = kernels.OPS.get(name)
    if op is None:
        raise NotImplementedError(
            f"bloomrun.kernels has no Triton `{name}`; set model.kernels: torch to run without it"
        )
    return op.custom_op if torch.compiler.is_compiling() else op.function


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """LayerNorm over the last dimension (also the embedding LayerNorm); y in x's dtype, or
    `out_dtype` when given (see `matmul_input_dtype`)."""
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y if out_dtype is None else y.to(out_dtype)


def matmul_input_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a matmul would cast `x` to under autocast, None without autocast.

    A LayerNorm whose output only feeds a matmul writes it in this dtype: autocast would cast
    it there anyway, and the Triton kernel can round in its own store instead of a separate
    cast kernel reading and writing the whole activation again. Same numbers either way.
    """
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU (tanh approximation, as BLOOM) of `x + bias`; x is a matmul output without its bias."""
    return F.gelu(x + bias, approximate="tanh")


def bias_swiglu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SwiGLU of `x + bias`: (..., 2F) -> (..., F) = silu(first half) * second half."""
    gate, up = (x + bias).chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k, each (B, T, H, D), by the angles whose cos/sin are (T, D/2) fp32.

    GPT-NeoX's "rotate half" pairing: element i is paired with element i + D/2, so
    out[:D/2] = x1 cos - x2 sin and out[D/2:] = x2 cos + x1 sin. Returns new tensors.
    """
    cos = cos[None, :, None, :]  # (1, T, 1, D/2)
    sin = sin[None, :, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi_slopes: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention, softmax scale 1/sqrt(D); q, k, v (B, T, H, D), maybe strided views.

    With `alibi_slopes` (H,), head h adds -slope[h] * (i - j) to the score of query i and key
    j. transformers adds +slope[h] * j instead, which differs by a per-row constant that the
    softmax cancels; the relative form keeps the bias small and needs no per-row offset.
    Returns (B, T, H, D).
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if alibi_slopes is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=alibi_causal_bias(alibi_slopes, q.shape[2], q.dtype))
    return out.transpose(1, 2)


def alibi_causal_bias(slopes: torch.Tensor, seq_length: int, dtype: torch.dtype) -> torch.Tensor:
    """(H, T, T) additive bias: -slope * (i - j) on and below the diagonal, -inf above it."""
    positions = torch.arange(seq_length, device=slopes.device)
    distance = positions[:, None] - positions[None, :]  # (T, T): i - j
    bias = -slopes.float()[:, None, None] * distance  # (H, T, T)
    bias = bias.masked_fill(distance < 0, -math.inf)
    return bias.to(dtype)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` over non-ignored rows.

    hidden (N, C), weight (V, C) (the tied embedding), targets (N,). The Triton path never
    materialises the (N, V) logits; the torch path does, in fp32 for the softmax.
    """
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


# ------------------------------------------------------------------- choosing a set


@dataclass(frozen=True)
class Kernels:
    """One implementation of every op the model calls, with the signatures above."""

    name: str
    layer_norm: Callable
    bias_gelu: Callable
    bias_swiglu: Callable
    apply_rotary: Callable
    attention: Callable
    linear_cross_entropy: Callable


def _triton(name: str) -> Callable:
    """`triton_op(name)`, looked up at each call: dynamo must see the lookup to pick the
    custom op while it compiles, and eager runs the autograd.Function."""

    def call(*args):
        return triton_op(name)(*args)

    call.__name__ = call.__qualname__ = f"triton_{name}"
    return call


OPS = ("layer_norm", "bias_gelu", "bias_swiglu", "apply_rotary", "attention", "linear_cross_entropy")
TORCH = Kernels("torch", layer_norm, bias_gelu, bias_swiglu, apply_rotary, attention, linear_cross_entropy)
TRITON = Kernels("triton", *(_triton(name) for name in OPS))


def resolve(backend: str, device: torch.device | str) -> Kernels:
    """The manifest's `model.kernels` for a model on `device`: "auto" is Triton on CUDA."""
    if backend not in BACKENDS:
        raise ValueError(f"kernels must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if torch.device(device).type == "cuda" else "torch"
    return TRITON if backend == "triton" else TORCH
