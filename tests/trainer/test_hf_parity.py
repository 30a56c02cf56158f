"""Numerical parity with transformers' BloomForCausalLM: same weights, same logits (fp32, 1e-4)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from bloomrun.trainer.export import load_hf_state_dict
from bloomrun.trainer.model import build_model
from bloomrun.trainer.model.positions import alibi_slopes
from tests.trainer.hf_helpers import model_cfg, random_hf_model

TOLERANCE = 1e-4  # the bar for fp32 logits


@pytest.mark.parametrize(
    "num_layers, hidden_size, num_heads",
    [
        (2, 96, 6),  # not a power of two: slopes from 4 heads plus every other of 8
        (2, 96, 12),  # not a power of two, head dim 8
        (3, 64, 8),  # power of two
        (1, 160, 5),  # odd head count, head dim 32
    ],
)
def test_logits_match_transformers(num_layers, hidden_size, num_heads):
    cfg = model_cfg(num_layers, hidden_size, num_heads)
    hf = random_hf_model(cfg)
    ours = build_model(cfg).eval()
    load_hf_state_dict(ours, hf.state_dict())
    ids = torch.randint(0, 300, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape == (3, 37, 384)
    assert expected.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    assert (got - expected).abs().max().item() <= TOLERANCE


def test_loss_matches_transformers_with_shifted_labels():
    # HF shifts labels inside the model; ours takes them already aligned.
    cfg = model_cfg(2, 96, 6)
    hf = random_hf_model(cfg, seed=3)
    ours = build_model(cfg).eval()
    load_hf_state_dict(ours, hf.state_dict())
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    with torch.no_grad():
        expected = hf(ids, labels=ids).loss
        got = ours(ids, labels=labels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gradients_match_transformers():
    cfg = model_cfg(2, 96, 12)
    hf = random_hf_model(cfg, seed=5)
    ours = build_model(cfg)
    load_hf_state_dict(ours, hf.state_dict())
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(4))
    hf(ids).logits.square().mean().backward()
    ours(ids).square().mean().backward()
    hf_grads = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        expected = hf_grads["transformer." + name].grad
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("num_heads", [1, 2, 3, 5, 6, 8, 12, 16, 20, 24, 32, 48, 96, 112, 128])
def test_alibi_slopes_match_transformers(num_heads):
    # HF's public builder returns slope * key_position, (H, 1, T); position 1 holds the slopes.
    hf = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)[:, 0, 1]
    torch.testing.assert_close(alibi_slopes(num_heads), hf, rtol=0, atol=1e-7)
