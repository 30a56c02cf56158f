"""ModelArgs: the architecture's arguments, resolved once from the user's ModelConfig.

The model is built from these plain, frozen values (torchtitan's `ModelArgs`), never from
the pydantic config: presets, overrides and vocabulary padding are settled here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bloomrun.trainer.config import ModelConfig, mlp_width


@dataclass(frozen=True)
class ModelArgs:
    num_layers: int
    hidden_size: int  # C
    num_heads: int  # H
    seq_length: int  # T at most (the learned position table's size)
    vocab_size: int  # V, already padded: the rows of the (tied) embedding
    position: Literal["alibi", "rotary", "learned", "none"] = "alibi"
    embedding_layernorm: bool = True
    activation: Literal["gelu", "swiglu"] = "gelu"
    layer_norm_epsilon: float = 1e-5
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:  # D
        return self.hidden_size // self.num_heads

    @property
    def mlp_width(self) -> int:  # F
        return mlp_width(self.hidden_size, self.activation)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "ModelArgs":
        """The preset with the config's overrides applied and the vocabulary padded."""
        shape = cfg.shape()
        return cls(
            num_layers=shape.num_layers, hidden_size=shape.hidden_size, num_heads=shape.num_heads,
            seq_length=shape.seq_length, vocab_size=cfg.padded_vocab_size, position=cfg.position,
            embedding_layernorm=cfg.embedding_layernorm, activation=cfg.activation,
            layer_norm_epsilon=cfg.layer_norm_epsilon, init_std=cfg.init_std,
        )
