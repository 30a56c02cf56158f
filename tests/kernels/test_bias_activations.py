import pytest
import torch

from bloomrun.kernels import bias_gelu as bias_gelu_module
from bloomrun.kernels import bias_swiglu as bias_swiglu_module
from bloomrun.kernels._launch import row_groups, tile_for
from bloomrun.kernels.bias_gelu import bias_gelu, bias_gelu_reference
from bloomrun.kernels.bias_swiglu import bias_swiglu, bias_swiglu_reference
from tests.kernels.conftest import DEVICE, DTYPES, ON_GPU, assert_close, leaf, upcast_leaf

# (leading shape, width of x): x's last dim is F for GELU and 2F for SwiGLU.
SHAPES = [((1, 1), 64), ((3, 7), 100), ((2, 19), 202)]
if ON_GPU:
    SHAPES += [((4, 1023), 8192), ((8192,), 5462 * 2)]

OPS = {"gelu": (bias_gelu, bias_gelu_reference), "swiglu": (bias_swiglu, bias_swiglu_reference)}
MODULES = {"gelu": bias_gelu_module, "swiglu": bias_swiglu_module}


def check_against_reference(op, lead, width, dtype):
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


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, width", SHAPES)
def test_bias_activation_matches_reference_forward_and_backward(op, lead, width, dtype):
    check_against_reference(op, lead, width, dtype)


# (rows, F, programs): each backward program loops over several row tiles and the last row
# group is shorter; the second case also has two column blocks, the last one partly masked.
GROUPED = [(229, 100, 3), (27, 1100, 6)]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n_rows, half, programs", GROUPED)
def test_bias_activation_backward_over_uneven_row_groups(monkeypatch, op, n_rows, half, programs):
    monkeypatch.setattr(MODULES[op], "num_programs_for", lambda *a, **k: programs)
    tile = tile_for(half)
    n_tiles, n_col_blocks = -(-n_rows // tile.rows), -(-half // tile.block_f)
    groups = row_groups(n_tiles, n_col_blocks, programs)
    # What this test is about: several groups, several tiles each, a short last group.
    assert groups.count > 1 and groups.tiles_each > 1 and groups.count * groups.tiles_each > n_tiles
    check_against_reference(op, (n_rows,), 2 * half if op == "swiglu" else half, torch.float32)


@pytest.mark.parametrize("op", OPS)
def test_bias_activation_reads_rows_of_a_wider_buffer(op):
    """x's rows may be further apart than its width (a slice); outputs come back contiguous."""
    fused, reference_fn = OPS[op]
    x = torch.randn(23, 300, device=DEVICE)[:, :202].requires_grad_(True)  # a strided leaf
    bias = leaf(torch.randn(202, device=DEVICE))
    out = fused(x, bias)
    grad_out = torch.randn(out.shape, device=DEVICE)
    out.backward(grad_out)
    reference = [upcast_leaf(x), upcast_leaf(bias)]
    expected = reference_fn(*reference)
    expected.backward(grad_out)
    assert x.stride(0) == 300 and out.is_contiguous()
    assert_close("y", out, expected, torch.float32)
    assert_close("dx", x.grad, reference[0].grad, torch.float32)
    assert_close("dbias", bias.grad, reference[1].grad, torch.float32)


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
