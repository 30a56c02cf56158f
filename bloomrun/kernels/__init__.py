"""Triton-fused kernels for the BLOOM block, each forward and backward with a torch reference.

One module per op; the module holds the kernels, host functions, the autograd.Function, the
torch custom op and the `<op>_reference` in plain torch:
    layer_norm.layer_norm(x, weight, bias, eps, out_dtype=None)
    bias_gelu.bias_gelu(x, bias)                      gelu_tanh(x + bias)
    bias_swiglu.bias_swiglu(x, bias)                  x (..., 2F) -> silu(a) * g, (..., F)
    attention.attention(q, k, v, alibi_slopes=None)   causal, (B, T, H, D), ALiBi from per-head slopes
    rotary.apply_rotary(q, k, cos, sin)               cos, sin (T, D/2), rotate-half convention
    cross_entropy.linear_cross_entropy(hidden, weight, targets, ignore_index=-100)

The package exports those modules and `OPS`, the table the model's ops.py calls through; no
function under a module's name (that made `import bloomrun.kernels.layer_norm as m` bind the
function). See docs/kernels.md.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from bloomrun.kernels import attention, bias_gelu, bias_swiglu, cross_entropy, layer_norm, rotary
from bloomrun.kernels import library  # registers the custom ops; after the kernels it wraps


class KernelOp(NamedTuple):
    """One op two ways, with one signature (ops.py picks; see there why)."""

    function: Callable  # through its autograd.Function: eager runs
    custom_op: Callable  # through torch.ops.bloomrun.*: what torch.compile traces, one graph node


OPS: dict[str, KernelOp] = {
    "layer_norm": KernelOp(layer_norm.layer_norm, library.layer_norm),
    "bias_gelu": KernelOp(bias_gelu.bias_gelu, library.bias_gelu),
    "bias_swiglu": KernelOp(bias_swiglu.bias_swiglu, library.bias_swiglu),
    "attention": KernelOp(attention.attention, library.attention),
    "apply_rotary": KernelOp(rotary.apply_rotary, library.apply_rotary),
    "linear_cross_entropy": KernelOp(cross_entropy.linear_cross_entropy, library.linear_cross_entropy),
}

__all__ = ["OPS", "KernelOp", "attention", "bias_gelu", "bias_swiglu", "cross_entropy", "layer_norm", "rotary"]
