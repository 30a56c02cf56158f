import pytest
import torch

from bloomrun.kernels import bias_gelu, bias_swiglu
from bloomrun.kernels.bias_gelu import bias_gelu_reference
from bloomrun.kernels.bias_swiglu import bias_swiglu_reference
from tests.kernels.conftest import DEVICE, DTYPES, ON_GPU, assert_close, leaf, upcast_leaf

# (leading shape, width of x): x's last dim is F for GELU and 2F for SwiGLU.
SHAPES = [((1, 1), 64), ((3, 7), 100), ((2, 19), 202)]
if ON_GPU:
    SHAPES += [((4, 1023), 8192), ((8192,), 5462 * 2)]

OPS = {"gelu": (bias_gelu, bias_gelu_reference), "swiglu": (bias_swiglu, bias_swiglu_reference)}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, width", SHAPES)
def test_bias_activation_matches_reference_forward_and_backward(op, lead, width, dtype):
    fused, reference_fn = OPS[op]
    x = (torch.randn(*lead, width, device=DEVICE) * 2).to(dtype)
    bias = (0.5 * torch.randn(width, device=DEVICE)).to(dtype)
    out_width = width // 2 if op == "swiglu" else width
    grad_out = torch.randn(*lead, out_width, device=DEVICE).to(dtype)

    inputs = [leaf(x), leaf(bias)]
    out = fused(*inputs)
    out.backward(grad_out)
    reference = [upcast_leaf(x), upcast_leaf(bias)]
    expected = reference_fn(*reference)
    expected.backward(grad_out.float())

    assert out.shape == (*lead, out_width) and out.dtype == dtype
    assert_close("y", out, expected, dtype)
    assert_close("dx", inputs[0].grad, reference[0].grad, dtype)
    # dbias sums dx over every row: compare it at the scale of that sum.
    assert_close("dbias", inputs[1].grad, reference[1].grad, dtype)


def test_bias_gelu_is_the_tanh_approximation_not_erf():
    x = torch.linspace(-4, 4, 64, device=DEVICE).view(1, 64)
    bias = torch.zeros(64, device=DEVICE)
    out = bias_gelu(x, bias)
    tanh_gelu = torch.nn.functional.gelu(x, approximate="tanh")
    erf_gelu = torch.nn.functional.gelu(x)
    assert (out - tanh_gelu).abs().max() < 1e-6 < (tanh_gelu - erf_gelu).abs().max()


def test_bias_swiglu_rejects_odd_width():
    with pytest.raises(ValueError, match="even last dimension"):
        bias_swiglu(torch.randn(2, 7, device=DEVICE), torch.zeros(7, device=DEVICE))
