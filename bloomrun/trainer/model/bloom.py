"""The BLOOM decoder with the paper's ablation knobs (position, embedding LayerNorm, activation).

Architecture only: no parallelism, precision or checkpointing here (the trainer applies those
from outside). Built from resolved, frozen ModelArgs (args.py), never from the user's config.
Module and parameter names follow transformers' BloomForCausalLM under its `transformer.`
prefix, so the HF export is a rename-free prefix (see ../export.py). Every compute op goes
through a `kernels` set (ops.py): torch by default, Triton once `Bloom.use_kernels` says so.

Shapes: B batch, T sequence, C hidden, H heads, D head dim, F MLP width, V padded vocabulary.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bloomrun.trainer.model import ops
from bloomrun.trainer.model.args import ModelArgs
from bloomrun.trainer.model.positions import alibi_slopes, rotary_cos_sin


class LayerNorm(nn.Module):
    """nn.LayerNorm's parameters (`weight`, `bias`) computed through the kernels' layer_norm.

    `feeds_matmul`: the output is only ever a matmul's input (every LayerNorm but the
    embedding one, whose output is the residual stream), so under autocast it may be written
    in the matmul's dtype directly (ops.matmul_input_dtype).
    """

    def __init__(self, size: int, eps: float, feeds_matmul: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps = eps
        self.feeds_matmul = feeds_matmul
        self.kernels = ops.TORCH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = ops.matmul_input_dtype(x) if self.feeds_matmul else None
        return self.kernels.layer_norm(x, self.weight, self.bias, self.eps, out_dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = args.num_heads
        self.head_dim = args.head_dim
        self.query_key_value = nn.Linear(args.hidden_size, 3 * args.hidden_size)
        self.dense = nn.Linear(args.hidden_size, args.hidden_size)
        self.kernels = ops.TORCH

    def forward(self, x: torch.Tensor, positions: PositionInputs) -> torch.Tensor:
        B, T, _ = x.shape
        # BLOOM's fused layout interleaves per head: [q_h, k_h, v_h] for each head h. The head
        # count comes from the output (-1): a tensor-parallel rank holds a whole-head slice of
        # it (bloomrun/trainer/tensor_parallel.py), H / tensor heads.
        qkv = self.query_key_value(x).view(B, T, -1, 3, self.head_dim)
        q, k, v = qkv.unbind(dim=3)  # each (B, T, H, D), strided views into qkv
        if positions.rotary is not None:
            q, k = self.kernels.apply_rotary(q, k, *positions.rotary)
        y = self.kernels.attention(q, k, v, positions.alibi_slopes)  # (B, T, H, D)
        return self.dense(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.activation = args.activation
        # SwiGLU: one fused GEMM makes both halves (gate, up), as the fused QKV does.
        fan_out = 2 * args.mlp_width if args.activation == "swiglu" else args.mlp_width
        self.dense_h_to_4h = nn.Linear(args.hidden_size, fan_out)
        self.dense_4h_to_h = nn.Linear(args.mlp_width, args.hidden_size)
        self.kernels = ops.TORCH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.dense_h_to_4h.weight)  # (B, T, F or 2F); bias fused into the activation
        if self.activation == "swiglu":
            h = self.kernels.bias_swiglu(h, self.dense_h_to_4h.bias)
        else:
            h = self.kernels.bias_gelu(h, self.dense_h_to_4h.bias)
        return self.dense_4h_to_h(h)  # (B, T, C)


class Block(nn.Module):
    """Pre-LN block; the residual is the block input (HF apply_residual_connection_post_layernorm=False)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = LayerNorm(args.hidden_size, args.layer_norm_epsilon)
        self.self_attention = Attention(args)
        self.post_attention_layernorm = LayerNorm(args.hidden_size, args.layer_norm_epsilon)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, positions: PositionInputs) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class PositionInputs(NamedTuple):
    """What attention needs to know about positions for one forward pass."""

    alibi_slopes: torch.Tensor | None = None  # (H,) fp32
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin), each (T, D/2) fp32


class Bloom(nn.Module):
    """BLOOM causal LM: embeddings (+LN) -> blocks -> ln_f -> LM head tied to the embeddings."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.position_embeddings = (
            nn.Embedding(args.seq_length, args.hidden_size) if args.position == "learned" else None
        )
        self.word_embeddings_layernorm = (
            LayerNorm(args.hidden_size, args.layer_norm_epsilon, feeds_matmul=False)
            if args.embedding_layernorm
            else None
        )
        self.h = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.ln_f = LayerNorm(args.hidden_size, args.layer_norm_epsilon)
        self.kernels = ops.TORCH
        self.reset_parameters()

    def use_kernels(self, kernels: ops.Kernels) -> "Bloom":
        """Compute every op with `kernels` (ops.TORCH, the default, or ops.TRITON): chosen once,
        from outside the model (see build_model), before it is compiled."""
        for module in self.modules():
            if isinstance(module, (Bloom, LayerNorm, Attention, MLP)):
                module.kernels = kernels
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, initStd) for weights and embeddings, zero biases, LayerNorms 1/0.

        Output projections (attention dense, dense_4h_to_h) use Megatron's scaled init,
        std / sqrt(2 * num_layers), as BLOOM did: each block adds two of them to the residual
        stream, and this keeps its variance from growing with depth. Draws happen in module
        order, so the same torch seed gives the same weights.
        """
        std = self.args.init_std
        scaled_std = std / math.sqrt(2 * self.args.num_layers)
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
        if self.args.position == "alibi":
            return PositionInputs(alibi_slopes=alibi_slopes(self.args.num_heads, device))
        if self.args.position == "rotary":
            return PositionInputs(rotary=rotary_cos_sin(seq_length, self.args.head_dim, device))
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
        return self.kernels.linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.word_embeddings.weight, labels.reshape(-1))
