"""Triton-fused kernels for the BLOOM block, each forward and backward with a torch reference.

Public API (the model's ops.py calls exactly these):
    layer_norm(x, weight, bias, eps)
    bias_gelu(x, bias)                      gelu_tanh(x + bias)
    bias_swiglu(x, bias)                    x (..., 2F) -> silu(a) * g, (..., F)
    attention(q, k, v, alibi_slopes=None)   causal, (B, T, H, D), ALiBi from per-head slopes
    apply_rotary(q, k, cos, sin)            cos, sin (T, D/2), rotate-half convention
    linear_cross_entropy(hidden, weight, targets, ignore_index=-100)
The same functions as torch custom ops (torch.ops.bloomrun.*), which torch.compile traces
without graph breaks, are in `bloomrun.kernels.library`. See docs/kernels.md.
"""

from bloomrun.kernels.attention import attention
from bloomrun.kernels.bias_gelu import bias_gelu
from bloomrun.kernels.bias_swiglu import bias_swiglu
from bloomrun.kernels.cross_entropy import linear_cross_entropy
from bloomrun.kernels.layer_norm import layer_norm
from bloomrun.kernels.rotary import apply_rotary
from bloomrun.kernels import library  # registers the custom ops; after the kernels it wraps

__all__ = ["apply_rotary", "attention", "bias_gelu", "bias_swiglu", "layer_norm", "linear_cross_entropy"]
