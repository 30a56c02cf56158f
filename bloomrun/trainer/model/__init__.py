"""The BLOOM model: architecture only (see docs/model.md)."""

from bloomrun.trainer.model.bloom import Bloom, mlp_width

__all__ = ["Bloom", "mlp_width"]
