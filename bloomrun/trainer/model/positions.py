"""Position information for the paper's ablation: ALiBi slopes and rotary angles.

The learned variant is a plain embedding table and lives in bloom.py; `none` needs nothing
(causal attention alone leaks position, which is why the paper found it "not that bad").
"""

from __future__ import annotations

import math

import torch

ROTARY_BASE = 10_000.0  # RoFormer's and GPT-NeoX's base for the rotation frequencies


def alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-head ALiBi slopes, (num_heads,) fp32.

    For n a power of two the slopes are the geometric sequence 2^(-8/n), 2^(-16/n), ...,
    2^(-8). Otherwise they are the n' = 2^floor(log2 n) slopes of n', followed by every
    other slope of 2n' (its odd-numbered ones) until there are n. This is the ALiBi paper's
    recipe that BLOOM (112 heads) used; it matches transformers' `build_alibi_tensor`.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    closest_power_of_two = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(closest_power_of_two)
    num_extra = num_heads - closest_power_of_two
    slopes += geometric(2 * closest_power_of_two)[0::2][:num_extra]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def rotary_cos_sin(
    seq_length: int, head_dim: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (T, head_dim // 2) fp32.

    Angle (t, i) = t * base^(-2i / head_dim): pair i of a head is rotated at frequency i.
    Computed in fp32 even under bf16 training, because t * freq reaches ~2000 rad at
    sequence 2048 and bf16 would put the angle off by more than a radian.
    """
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head dimension, got {head_dim}")
    inv_freq = ROTARY_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()
