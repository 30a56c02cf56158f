import pytest
import torch

from bloomrun.kernels import layer_norm
from bloomrun.kernels.layer_norm import layer_norm_reference
from tests.kernels.conftest import DEVICE, DTYPES, ON_GPU, assert_close, leaf, upcast_leaf

# (leading shape, C): a single row, odd row counts, widths that are not powers of two.
SHAPES = [((1, 1), 64), ((3, 7), 100), ((2, 37), 257)]
if ON_GPU:
    SHAPES += [((4, 1023), 2048), ((8192,), 2048), ((3, 333), 14336)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, width", SHAPES)
def test_layer_norm_matches_reference_forward_and_backward(lead, width, dtype):
    x = (torch.randn(*lead, width, device=DEVICE) * 2 + 0.5).to(dtype)
    weight = (1 + 0.1 * torch.randn(width, device=DEVICE)).to(dtype)
    bias = (0.1 * torch.randn(width, device=DEVICE)).to(dtype)
    grad_out = torch.randn(*lead, width, device=DEVICE).to(dtype)

    inputs = [leaf(t) for t in (x, weight, bias)]
    out = layer_norm(*inputs, 1e-5)
    out.backward(grad_out)
    reference = [upcast_leaf(t) for t in (x, weight, bias)]
    expected = layer_norm_reference(*reference, 1e-5)
    expected.backward(grad_out.float())

    assert out.dtype == dtype
    assert_close("y", out, expected, dtype)
    for name, got, want in zip(("dx", "dweight", "dbias"), inputs, reference):
        assert_close(name, got.grad, want.grad, dtype)


def test_layer_norm_accepts_fp32_weights_with_half_input():
    """Under autocast the model's LayerNorm weights stay fp32 while activations are half."""
    x = leaf(torch.randn(5, 48, device=DEVICE).half())
    weight, bias = leaf(torch.rand(48, device=DEVICE) + 0.5), leaf(torch.randn(48, device=DEVICE))
    out = layer_norm(x, weight, bias, 1e-5)
    out.float().sum().backward()
    assert out.dtype == torch.float16 and weight.grad.dtype == torch.float32
    expected = layer_norm_reference(x.detach().float(), weight.detach(), bias.detach(), 1e-5)
    assert_close("y", out, expected, torch.float16)


def test_layer_norm_rejects_wrong_weight_shape():
    with pytest.raises(ValueError, match="weight/bias"):
        layer_norm(torch.randn(2, 8, device=DEVICE), torch.ones(4, device=DEVICE), torch.zeros(8, device=DEVICE), 1e-5)
