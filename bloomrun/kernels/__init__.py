"""Triton-fused kernels for the BLOOM block, each forward and backward with a torch reference.

One module per op; the module holds the kernels, host functions, the autograd.Function, the
torch custom op and the `<op>_reference` in plain torch:
    layer_norm.layer_norm(x, weight, bias, eps, out_dtype=None)
    bias_gelu.bias_gelu(x, bias)                      gelu_tanh(x + bias)
    bias_swiglu.bias_swiglu(x, bias)                  x (..., 2F) -> silu(a) * g, (..., F)
    attention.attention(q, k, v, alibi_slopes=None)   causal, (B, T, H, D), ALiBi from per-head slopes
    rotary.apply_rotary(q, k, cos, sin)               cos, sin (T, D/2), rotate-half convention
    cross_entropy.linear_cross_entropy(hidden, weight, targets, ignore_index=-100)

Each op comes two ways with one signature: `<op>` through its autograd.Function, and
`<op>_custom_op` through torch custom ops (namespace `bloomrun`, registered beside the op).
Dynamo cannot trace into a Triton launch or an autograd.Function that launches one without
breaking the graph, and each break stops Inductor from fusing the glue between kernels
(residual adds, bias adds, casts). A custom op is one opaque node instead: `register_fake`
gives its output shapes, dtypes and strides (those the host function really returns: new
contiguous tensors), so tracing never runs a kernel, and `register_autograd` pairs each
forward op with a backward op, opaque as well. Eager runs keep the autograd.Function:
custom-op dispatch costs host time on every call, and the memory-bound kernels are already
launch-bound (BENCHMARKS.md). References: torch docs "Custom Python Operators".

The package exports those modules and `OPS`, the table the model's ops.py calls through; no
function under a module's name (that made `import bloomrun.kernels.layer_norm as m` bind the
function). See docs/kernels.md.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from bloomrun.kernels import attention, bias_gelu, bias_swiglu, cross_entropy, layer_norm, rotary


class KernelOp(NamedTuple):
    """One op two ways, with one signature (ops.py picks; see there why)."""

    function: Callable  # through its autograd.Function: eager runs
    custom_op: Callable  # through torch.ops.bloomrun.*: what torch.compile traces, one graph node


OPS: dict[str, KernelOp] = {
    "layer_norm": KernelOp(layer_norm.layer_norm, layer_norm.layer_norm_custom_op),
    "bias_gelu": KernelOp(bias_gelu.bias_gelu, bias_gelu.bias_gelu_custom_op),
    "bias_swiglu": KernelOp(bias_swiglu.bias_swiglu, bias_swiglu.bias_swiglu_custom_op),
    "attention": KernelOp(attention.attention, attention.attention_custom_op),
    "apply_rotary": KernelOp(rotary.apply_rotary, rotary.apply_rotary_custom_op),
    "linear_cross_entropy": KernelOp(cross_entropy.linear_cross_entropy, cross_entropy.linear_cross_entropy_custom_op),
}

__all__ = ["OPS", "KernelOp", "attention", "bias_gelu", "bias_swiglu", "cross_entropy", "layer_norm", "rotary"]
