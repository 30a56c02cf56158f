import pytest
import torch

from bloomrun.kernels.rotary import apply_rotary, rotary_reference
from bloomrun.trainer.model.positions import rotary_cos_sin
from tests.kernels.conftest import DEVICE, DTYPES, ON_GPU, assert_close, upcast_leaf

SHAPES = [(1, 1, 2, 16), (2, 7, 3, 16), (1, 37, 5, 24)]
if ON_GPU:
    SHAPES += [(4, 1023, 16, 128), (2, 2048, 16, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rotary_matches_reference_forward_and_backward(shape, dtype):
    batch, seq, heads, head_dim = shape
    qkv = torch.randn(batch, seq, heads, 3, head_dim, device=DEVICE).to(dtype).requires_grad_(True)
    q, k, _ = qkv.unbind(dim=3)  # strided views, as the model passes them
    cos, sin = rotary_cos_sin(seq, head_dim, device=DEVICE)
    grads = [torch.randn(shape, device=DEVICE).to(dtype) for _ in range(2)]

    outs = apply_rotary(q, k, cos, sin)
    torch.autograd.backward(outs, grads)
    reference_qkv = upcast_leaf(qkv)
    rq, rk, _ = reference_qkv.unbind(dim=3)
    expected = rotary_reference(rq, rk, cos, sin)
    torch.autograd.backward(expected, [g.float() for g in grads])

    for name, got, want in zip(("q_rot", "k_rot"), outs, expected):
        assert got.dtype == dtype
        assert_close(name, got, want, dtype)
    assert_close("dq", qkv.grad[:, :, :, 0], reference_qkv.grad[:, :, :, 0], dtype)
    assert_close("dk", qkv.grad[:, :, :, 1], reference_qkv.grad[:, :, :, 1], dtype)
    assert torch.all(qkv.grad[:, :, :, 2] == 0)


def test_rotary_preserves_norm_and_position_zero():
    q = torch.randn(1, 5, 2, 32, device=DEVICE)
    k = torch.randn(1, 5, 2, 32, device=DEVICE)
    cos, sin = rotary_cos_sin(5, 32, device=DEVICE)
    q_rot, _ = apply_rotary(q, k, cos, sin)
    assert_close("position 0 unrotated", q_rot[:, 0], q[:, 0], torch.float32)
    assert_close("norm", q_rot.norm(dim=-1), q.norm(dim=-1), torch.float32)


def test_rotary_rejects_full_width_angles():
    q = torch.randn(1, 5, 2, 32, device=DEVICE)
    cos = torch.ones(5, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(T, D/2\)"):
        apply_rotary(q, q, cos, cos)
