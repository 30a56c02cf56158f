import pytest
import torch

from bloomrun.kernels import layer_norm as layer_norm_module
from bloomrun.kernels.layer_norm import layer_norm, layer_norm_reference
from tests.kernels.conftest import DEVICE, DTYPES, ON_GPU, assert_close, leaf, upcast_leaf

# (leading shape, C): a single row, odd row counts, widths that are not powers of two, and a
# wide row (BLOOM-176B's 14336: one row per program, 16 warps).
SHAPES = [((1, 1), 64), ((3, 7), 100), ((2, 37), 257), ((3,), 14336)]
if ON_GPU:
    SHAPES += [((4, 1023), 2048), ((8192,), 2048), ((3, 333), 14336)]


def check_against_reference(lead, width, dtype):
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, width", SHAPES)
def test_layer_norm_matches_reference_forward_and_backward(lead, width, dtype):
    check_against_reference(lead, width, dtype)


def test_layer_norm_backward_with_more_row_blocks_than_programs(monkeypatch):
    """Persistent programs loop over row blocks; the count here is not a multiple of them."""
    monkeypatch.setattr(layer_norm_module, "num_programs_for", lambda *a, **k: 4)
    n_rows, width = 229, 100
    tile = layer_norm_module.row_tile(width, 4, layer_norm_module._BACKWARD_TILE_BYTES)
    n_row_blocks = -(-n_rows // tile.rows)
    assert n_row_blocks > 4 and n_row_blocks % 4 and n_rows % tile.rows  # what this test is about
    check_against_reference((n_rows,), width, torch.float32)


def test_layer_norm_reads_rows_of_a_wider_buffer():
    """x's rows may be further apart than its width (a slice); y and dx come back contiguous."""
    x = torch.randn(37, 160, device=DEVICE)[:, :100].requires_grad_(True)  # a strided leaf
    weight, bias = leaf(torch.rand(100, device=DEVICE) + 0.5), leaf(torch.randn(100, device=DEVICE))
    grad_out = torch.randn(37, 100, device=DEVICE)
    out = layer_norm(x, weight, bias, 1e-5)
    out.backward(grad_out)
    reference = [upcast_leaf(t) for t in (x, weight, bias)]
    layer_norm_reference(*reference, 1e-5).backward(grad_out)
    assert x.stride(0) == 160 and out.is_contiguous()
    assert_close("y", out, layer_norm_reference(*reference, 1e-5), torch.float32)
    for name, got, want in zip(("dx", "dweight", "dbias"), (x, weight, bias), reference):
        assert_close(name, got.grad, want.grad, torch.float32)


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


@pytest.mark.parametrize("out_dtype", [d for d in DTYPES if d != torch.float32], ids=str)
def test_layer_norm_writes_the_requested_output_dtype(out_dtype):
    """fp32 activations (autocast's residual stream) normalised straight into the matmul's
    dtype: y is the fp32 result rounded once, dx stays fp32, and the gradient that arrives
    in the half dtype (from the matmul) is read as it is."""
    lead, width = (3, 5), 96
    x = leaf(torch.randn(*lead, width, device=DEVICE) * 2 + 0.5)
    weight = leaf(1 + 0.1 * torch.randn(width, device=DEVICE))
    bias = leaf(0.1 * torch.randn(width, device=DEVICE))
    grad_out = torch.randn(*lead, width, device=DEVICE).to(out_dtype)

    out = layer_norm(x, weight, bias, 1e-5, out_dtype=out_dtype)
    out.backward(grad_out)
    reference = [upcast_leaf(t) for t in (x, weight, bias)]
    expected = layer_norm_reference(*reference, 1e-5)
    expected.backward(grad_out.float())

    assert out.dtype == out_dtype and x.grad.dtype == torch.float32
    assert_close("y", out, expected.to(out_dtype), out_dtype)
    for name, got, want in zip(("dx", "dweight", "dbias"), (x, weight, bias), reference):
        assert_close(name, got.grad, want.grad, torch.float32)
