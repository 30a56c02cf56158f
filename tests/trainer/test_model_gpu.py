"""The model on a CUDA device: HF parity there, and the default (auto = Triton) path against torch."""

from __future__ import annotations

import pytest
import torch

from bloomrun.trainer.export import load_hf_state_dict
from bloomrun.trainer.model import build_model
from tests.trainer.hf_helpers import model_cfg, random_hf_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("num_heads", [6, 16])
def test_torch_path_matches_transformers_on_cuda(num_heads):
    cfg = model_cfg(2, 128 if num_heads == 16 else 96, num_heads)
    hf = random_hf_model(cfg).cuda()
    ours = build_model(cfg).eval()
    load_hf_state_dict(ours, hf.state_dict())
    ours.cuda()
    ids = torch.randint(0, 300, (2, 333), device="cuda")
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("position", ["alibi", "rotary", "none"])
def test_default_kernels_on_cuda_agree_with_torch(position):
    # auto means Triton on CUDA: the trainer's default path must train the same model.
    cfg = model_cfg(2, 256, 4).model_copy(update={"position": position})
    torch.manual_seed(0)
    reference = build_model(cfg, "cuda")
    fused = build_model(cfg.model_copy(update={"kernels": "auto"}), "cuda")
    fused.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 300, (2, 257), device="cuda")
    losses = []
    for model in (reference, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids)
        loss.backward()
        losses.append(loss.float())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
    # bf16 rounds in different places on the two paths, so compare each gradient as a whole.
    for (name, p_ref), p_fused in zip(reference.named_parameters(), fused.parameters()):
        relative = (p_fused.grad - p_ref.grad).norm() / p_ref.grad.norm()
        assert relative < 5e-2, f"{name}: relative gradient error {relative:.3g}"
