import pytest
import torch

from bloomrun.kernels import cross_entropy
from bloomrun.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from tests.kernels.conftest import DEVICE, DTYPES, ON_GPU, assert_close, leaf, upcast_leaf

# (N tokens, C hidden, V vocabulary): odd sizes, a vocab that is not a multiple of the block.
SHAPES = [(1, 16, 130), (37, 32, 300), (64, 48, 1000)]
if ON_GPU:
    SHAPES += [(1023, 512, 50304), (4096, 2048, 250880)]


def run_both(num_tokens, hidden_size, vocab, dtype, ignored=(), loss_scale=1.0):
    hidden = torch.randn(num_tokens, hidden_size, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=DEVICE) / hidden_size**0.5).to(dtype)
    targets = torch.randint(0, vocab, (num_tokens,), device=DEVICE)
    targets[list(ignored)] = -100
    inputs = [leaf(hidden), leaf(weight)]
    loss = linear_cross_entropy(*inputs, targets)
    (loss * loss_scale).backward()
    reference = [upcast_leaf(hidden), upcast_leaf(weight)]
    expected = linear_cross_entropy_reference(*reference, targets)
    (expected * loss_scale).backward()
    return loss, expected, inputs, reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_cross_entropy_matches_reference(shape, dtype):
    num_tokens = shape[0]
    ignored = [0, num_tokens // 2] if num_tokens > 2 else []
    loss, expected, inputs, reference = run_both(*shape, dtype, ignored=ignored)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close("loss", loss, expected, dtype)
    assert_close("dhidden", inputs[0].grad, reference[0].grad, dtype)
    assert_close("dweight", inputs[1].grad, reference[1].grad, dtype)
    if ignored:
        assert torch.all(inputs[0].grad[ignored] == 0)


def test_chunks_give_the_same_result_as_one_pass(monkeypatch):
    """Force 4-row chunks: the normaliser must be the whole batch's valid count."""
    monkeypatch.setattr(cross_entropy, "MAX_CHUNK_ELEMENTS", 4 * 300)
    loss, expected, inputs, reference = run_both(37, 32, 300, torch.float32, ignored=[1, 2, 30])
    assert_close("loss", loss, expected, torch.float32)
    assert_close("dhidden", inputs[0].grad, reference[0].grad, torch.float32)
    assert_close("dweight", inputs[1].grad, reference[1].grad, torch.float32)


def test_upstream_gradient_scales_both_gradients():
    loss, expected, inputs, reference = run_both(9, 16, 130, torch.float32, loss_scale=3.5)
    assert_close("dhidden", inputs[0].grad, reference[0].grad, torch.float32)
    assert_close("dweight", inputs[1].grad, reference[1].grad, torch.float32)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(torch.randn(4, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE))
