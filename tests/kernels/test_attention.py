import math

import pytest
import torch

from bloomrun.kernels.attention import attention, attention_forward, attention_reference
from tests.kernels.conftest import DEVICE, DTYPES, ON_GPU, assert_close, upcast_leaf

# (B, T, H, D): one token, odd lengths, lengths that are not a multiple of the block (16 on
# the interpreter), a head dim that is not a power of two (BLOOM-1b1 has 96).
SHAPES = [(1, 1, 2, 16), (2, 7, 3, 16), (1, 37, 2, 24), (2, 40, 3, 32)]
CASES = [(shape, dtype) for shape in SHAPES for dtype in DTYPES]
if ON_GPU:  # full size in the training dtypes (fp32 tiles of D = 128 need other configs)
    CASES += [
        (shape, dtype)
        for shape in [(2, 1023, 4, 64), (1, 1023, 2, 128), (1, 1000, 3, 96), (2, 2048, 4, 128)]
        for dtype in (torch.float16, torch.bfloat16)
    ]


def bloom_slopes(num_heads: int) -> torch.Tensor:
    return torch.tensor([2 ** (-8 * (h + 1) / num_heads) for h in range(num_heads)], device=DEVICE)


def fused_qkv(batch, seq, heads, head_dim, dtype):
    """q, k, v as BLOOM makes them: strided views of one (B, T, H, 3, D) buffer."""
    qkv = torch.randn(batch, seq, heads, 3, head_dim, device=DEVICE).to(dtype).requires_grad_(True)
    return qkv, qkv.unbind(dim=3)


@pytest.mark.parametrize("position", ["alibi", "none"])
@pytest.mark.parametrize("shape, dtype", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_attention_matches_reference_forward_and_backward(shape, dtype, position):
    batch, seq, heads, head_dim = shape
    qkv, (q, k, v) = fused_qkv(batch, seq, heads, head_dim, dtype)
    slopes = bloom_slopes(heads) if position == "alibi" else None
    grad_out = torch.randn(batch, seq, heads, head_dim, device=DEVICE).to(dtype)

    out = attention(q, k, v, slopes)
    out.backward(grad_out)
    reference_qkv = upcast_leaf(qkv)
    expected = attention_reference(*reference_qkv.unbind(dim=3), slopes)
    expected.backward(grad_out.float())

    assert out.shape == q.shape and out.dtype == dtype
    assert_close("o", out, expected, dtype)
    for index, name in enumerate(("dq", "dk", "dv")):
        assert_close(name, qkv.grad[:, :, :, index], reference_qkv.grad[:, :, :, index], dtype)


def test_alibi_changes_the_output_and_is_relative():
    """Slopes matter, and shifting every score of a row by a constant (what transformers'
    slope * j form does) would not: our bias depends on j - i only."""
    _, (q, k, v) = fused_qkv(1, 20, 2, 16, torch.float32)
    with torch.no_grad():
        with_alibi = attention(q, k, v, bloom_slopes(2))
        without = attention(q, k, v, None)
        steep = attention(q, k, v, bloom_slopes(2) * 4)
    assert (with_alibi - without).abs().max() > 1e-3
    assert (with_alibi - steep).abs().max() > 1e-3
    # The first query sees only key 0: its output is v[0] whatever the bias.
    assert_close("row 0", with_alibi[:, 0], v[:, 0], torch.float32)


def test_stored_log_sum_exp_is_the_true_one():
    """The forward shifts each row's scores by a block-relative constant and the backward
    kernels undo it with their own (differently tuned) block sizes: that only works if the
    forward stores the unshifted log-sum-exp. On the interpreter all blocks are equal, so a
    shift left in would cancel in the gradient tests above; here it cannot."""
    batch, seq, heads, head_dim = 1, 45, 3, 16
    _, (q, k, v) = fused_qkv(batch, seq, heads, head_dim, torch.float32)
    slopes = bloom_slopes(heads) * 4  # steep, so a per-row shift would be large
    with torch.no_grad():
        _, lse = attention_forward(q, k, v, slopes)
        scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(head_dim)
        distance = (torch.arange(seq, device=DEVICE)[None, :] - torch.arange(seq, device=DEVICE)[:, None]).float()
        scores = (scores + slopes.view(1, -1, 1, 1) * distance).masked_fill(distance > 0, float("-inf"))
        expected = torch.logsumexp(scores, dim=-1) / math.log(2)  # log2 units, (B, H, T)
    assert_close("lse", lse.view(batch, heads, seq), expected, torch.float32)


def test_attention_is_causal():
    _, (q, k, v) = fused_qkv(1, 23, 2, 16, torch.float32)
    with torch.no_grad():
        before = attention(q, k, v, bloom_slopes(2))
        k2, v2 = k.clone(), v.clone()
        k2[:, 11:] += 5.0
        v2[:, 11:] -= 3.0
        after = attention(q, k2, v2, bloom_slopes(2))
    assert torch.equal(before[:, :11], after[:, :11])
    assert not torch.allclose(before[:, 11:], after[:, 11:])


def test_attention_rejects_mismatched_inputs():
    q = torch.randn(1, 4, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        attention(q, q[:, :3], q)
    with pytest.raises(ValueError, match="alibi_slopes"):
        attention(q, q, q, torch.ones(3, device=DEVICE))
    every_other = torch.randn(1, 4, 2, 32, device=DEVICE)[..., ::2]  # last-dim stride 2
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        attention(q, q, every_other)
