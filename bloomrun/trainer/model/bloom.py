"""The BLOOM decoder with the paper's ablation knobs (position, embedding LayerNorm, activation).

Architecture only: no parallelism, precision or checkpointing here (the trainer applies those
from outside). Module and parameter names follow transformers' BloomForCausalLM under its
`transformer.` prefix, so the HF export is a rename-free prefix (see ../export.py). Every
compute op goes through ops.py, which picks the torch or Triton implementation.

Shapes: B batch, T sequence, C hidden, H heads, D head dim, V padded vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bloomrun.trainer.config import ModelConfig
from bloomrun.trainer.model import ops
from bloomrun.trainer.model.positions import alibi_slopes, rotary_cos_sin

SWIGLU_WIDTH_MULTIPLE = 64


def mlp_width(hidden_size: int, activation: str) -> int:
    """Inner MLP width F.

    GELU: 4C, as BLOOM. SwiGLU has three C x F matrices instead of two, so F = 2/3 * 4C keeps
    the parameter count (and FLOPs) matched; rounded to a multiple of 64 for GEMM tiling.
    """
    if activation == "gelu":
        return 4 * hidden_size
    if activation == "swiglu":
        rounded = round(8 * hidden_size / 3 / SWIGLU_WIDTH_MULTIPLE) * SWIGLU_WIDTH_MULTIPLE
        return max(SWIGLU_WIDTH_MULTIPLE, rounded)
    raise ValueError(f"activation must be gelu or swiglu, got {activation!r}")


class LayerNorm(nn.Module):
    """nn.LayerNorm's parameters (`weight`, `bias`) computed through ops.layer_norm.

    `feeds_matmul`: the output is only ever a matmul's input (every LayerNorm but the
    embedding one, whose output is the residual stream), so under autocast it may be written
    in the matmul's dtype directly (ops.matmul_input_dtype).
    """

    def __init__(self, size: int, eps: float, backend: str, feeds_matmul: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps = eps
        self.backend = backend
        self.feeds_matmul = feeds_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = ops.matmul_input_dtype(x) if self.feeds_matmul else None
        return ops.layer_norm(x, self.weight, self.bias, self.eps, out_dtype=out_dtype, backend=self.backend)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        shape = cfg.shape()
        self.num_heads = shape.num_heads
        self.head_dim = shape.hidden_size // shape.num_heads
        self.backend = cfg.kernels
        self.query_key_value = nn.Linear(shape.hidden_size, 3 * shape.hidden_size)
        self.dense = nn.Linear(shape.hidden_size, shape.hidden_size)

    def forward(self, x: torch.Tensor, positions: "PositionInputs") -> torch.Tensor:
        B, T, C = x.shape
        # BLOOM's fused layout interleaves per head: [q_h, k_h, v_h] for each head h.
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.unbind(dim=3)  # each (B, T, H, D), strided views into qkv
        if positions.rotary is not None:
            q, k = ops.apply_rotary(q, k, *positions.rotary, backend=self.backend)
        y = ops.attention(q, k, v, positions.alibi_slopes, backend=self.backend)  # (B, T, H, D)
        return self.dense(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.shape().hidden_size
        width = mlp_width(hidden, cfg.activation)
        self.activation = cfg.activation
        self.backend = cfg.kernels
        # SwiGLU: one fused GEMM makes both halves (gate, up), as the fused QKV does.
        fan_out = 2 * width if cfg.activation == "swiglu" else width
        self.dense_h_to_4h = nn.Linear(hidden, fan_out)
        self.dense_4h_to_h = nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.dense_h_to_4h.weight)  # bias is fused into the activation
        if self.activation == "swiglu":
            h = ops.bias_swiglu(h, self.dense_h_to_4h.bias, backend=self.backend)
        else:
            h = ops.bias_gelu(h, self.dense_h_to_4h.bias, backend=self.backend)
        return self.dense_4h_to_h(h)


class Block(nn.Module):
    """Pre-LN block; the residual is the block input (HF apply_residual_connection_post_layernorm=False)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.shape().hidden_size
        self.input_layernorm = LayerNorm(hidden, cfg.layer_norm_epsilon, cfg.kernels)
        self.self_attention = Attention(cfg)
        self.post_attention_layernorm = LayerNorm(hidden, cfg.layer_norm_epsilon, cfg.kernels)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, positions: "PositionInputs") -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class PositionInputs:
    """What attention needs to know about positions for one forward pass."""

    def __init__(self, alibi_slopes: torch.Tensor | None = None, rotary: tuple | None = None):
        self.alibi_slopes = alibi_slopes  # (H,) fp32
        self.rotary = rotary  # (cos, sin), each (T, D/2) fp32


class Bloom(nn.Module):
    """BLOOM causal LM: embeddings (+LN) -> blocks -> ln_f -> LM head tied to the embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        shape = cfg.shape()
        self.cfg = cfg
        self.vocab_size = cfg.padded_vocab_size
        self.word_embeddings = nn.Embedding(self.vocab_size, shape.hidden_size)
        self.position_embeddings = (
            nn.Embedding(shape.seq_length, shape.hidden_size) if cfg.position == "learned" else None
        )
        self.word_embeddings_layernorm = (
            LayerNorm(shape.hidden_size, cfg.layer_norm_epsilon, cfg.kernels, feeds_matmul=False)
            if cfg.embedding_layernorm
            else None
        )
        self.h = nn.ModuleList(Block(cfg) for _ in range(shape.num_layers))
        self.ln_f = LayerNorm(shape.hidden_size, cfg.layer_norm_epsilon, cfg.kernels)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, initStd) for weights and embeddings, zero biases, LayerNorms 1/0.

        Output projections (attention dense, dense_4h_to_h) use Megatron's scaled init,
        std / sqrt(2 * num_layers), as BLOOM did: each block adds two of them to the residual
        stream, and this keeps its variance from growing with depth. Draws happen in module
        order, so the same torch seed gives the same weights.
        """
        std = self.cfg.init_std
        scaled_std = std / math.sqrt(2 * self.cfg.shape().num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
            elif isinstance(module, nn.Linear):
                is_output = name.endswith(".dense") or name.endswith("dense_4h_to_h")
                module.weight.normal_(0.0, scaled_std if is_output else std)
                module.bias.zero_()
            elif isinstance(module, LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; the tied LM head is counted once (it is the embedding)."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(
            p.numel() for p in self.parameters() if not (exclude_embeddings and id(p) in embeddings)
        )

    def position_inputs(self, seq_length: int, device: torch.device) -> PositionInputs:
        shape = self.cfg.shape()
        if self.cfg.position == "alibi":
            return PositionInputs(alibi_slopes=alibi_slopes(shape.num_heads, device))
        if self.cfg.position == "rotary":
            return PositionInputs(rotary=rotary_cos_sin(seq_length, shape.hidden_size // shape.num_heads, device))
        return PositionInputs()

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states after ln_f, (B, T, C)."""
        B, T = input_ids.shape
        x = self.word_embeddings(input_ids)  # (B, T, C)
        if self.position_embeddings is not None:
            if T > self.position_embeddings.num_embeddings:
                raise ValueError(
                    f"sequence of {T} tokens is longer than the {self.position_embeddings.num_embeddings} "
                    "learned positions (model.seqLength)"
                )
            x = x + self.position_embeddings(torch.arange(T, device=input_ids.device))
        if self.word_embeddings_layernorm is not None:
            x = self.word_embeddings_layernorm(x)
        positions = self.position_inputs(T, input_ids.device)
        for block in self.h:
            x = block(x, positions)
        return self.ln_f(x)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) without labels; else the mean cross-entropy where labels != -100.

        labels[b, t] is the target of position t (already shifted by the data pipeline).
        """
        x = self.hidden_states(input_ids)
        if labels is None:
            return F.linear(x, self.word_embeddings.weight)  # (B, T, V)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        return ops.linear_cross_entropy(
            x.reshape(-1, x.shape[-1]), self.word_embeddings.weight, labels.reshape(-1), backend=self.cfg.kernels
        )
