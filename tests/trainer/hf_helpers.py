"""Shared builders for the tests that compare with transformers' BloomForCausalLM."""

from __future__ import annotations

import torch
from transformers import BloomConfig, BloomForCausalLM

from bloomrun.trainer.config import ModelConfig


def model_cfg(num_layers: int, hidden_size: int, num_heads: int, vocab_size: int = 300) -> ModelConfig:
    return ModelConfig(
        preset=None, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
        seq_length=64, vocab_size=vocab_size, kernels="torch",
    )


def random_hf_model(cfg: ModelConfig, seed: int = 0) -> BloomForCausalLM:
    """A BloomForCausalLM with random weights everywhere (no download).

    HF initialises LayerNorms to 1/0 and biases to 0, which would hide a swapped LayerNorm or
    a dropped bias; every parameter is perturbed so each one matters to the logits.
    """
    shape = cfg.shape()
    hf_cfg = BloomConfig(
        vocab_size=cfg.padded_vocab_size, hidden_size=shape.hidden_size, n_layer=shape.num_layers,
        n_head=shape.num_heads, layer_norm_epsilon=cfg.layer_norm_epsilon,
    )
    torch.manual_seed(seed)
    hf = BloomForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return hf
