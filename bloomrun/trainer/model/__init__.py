"""The BLOOM model: architecture only (see docs/model.md)."""

from __future__ import annotations

import torch

from bloomrun.trainer.config import ModelConfig
from bloomrun.trainer.model import ops
from bloomrun.trainer.model.args import ModelArgs, mlp_width
from bloomrun.trainer.model.bloom import Bloom

__all__ = ["Bloom", "ModelArgs", "build_model", "mlp_width"]


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> Bloom:
    """The one way from the user's model section to a model on `device`: arguments resolved
    once, weights drawn (from torch's current seed), moved, kernels chosen for the device."""
    model = Bloom(ModelArgs.from_config(cfg)).to(device)
    return model.use_kernels(ops.resolve(cfg.kernels, device))
