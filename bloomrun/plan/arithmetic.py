"""The paper's cost arithmetic: parameters from a shape, training FLOPs, GPU-hours.

GPU-hours = k * params * tokens / achieved FLOP/s per GPU / 3600, with k = 8 when activations
are recomputed (2 FLOPs per multiply-add x (forward + recomputed forward + 2 x backward)) and
6 without (../shared/PAPER.md, "Choosing the final size and shape"). The achieved FLOP/s are
*hardware* FLOP/s in that convention: BLOOM's ~150 TFLOP/s per A100 counted the recomputed
forward too (~36% MFU in 6N terms), so the rate stays the same and k changes with recompute.

Torch-free on purpose: the BloomStudy budget check (operator side) imports this module, and
the operator never imports torch (importing it costs ~6 s on the 2-core VM).
"""

from __future__ import annotations

from dataclasses import dataclass

from bloomrun.trainer.config import ModelConfig, mlp_width

# Achieved hardware TFLOP/s per GPU for BLOOM-like training (bf16, 3-D parallel, large GEMMs).
# A planning default only: `bloomctl plan --tflops` overrides it and `--tflops-from` measures it.
ACHIEVED_TFLOPS: dict[str, float] = {
    # BLOOM-176B on 384 A100-80GB (TP4 PP12 DP8): 149-150 TFLOP/s measured, the paper's 150.
    "a100-80gb": 150.0,
    # The same chip (312 TFLOP/s dense bf16 peak) with half the memory: the same rate per GPU
    # once the model is split finely enough to fit; not measured separately by BigScience.
    "a100-40gb": 150.0,
    # Megatron-Core's published GPT-3 175B figure on H100 (TP4 PP8, 128-512 GPUs): 390 TFLOP/s
    # per GPU, counted without the (selective) recompute, so about the hardware rate.
    "h100-80gb": 390.0,
    # H100's SMs and clocks (same 989 TFLOP/s dense bf16 peak) with more and faster HBM: the
    # H100 figure. bloomrun's own 1.3B step on one H200 measured 353 model TFLOP/s (ZeRO 1,
    # BENCHMARKS.md), consistent with it before any multi-node communication.
    "h200": 390.0,
}

RECOMPUTE_FLOPS_PER_PARAM_TOKEN = 8  # 2 x (forward + recomputed forward + 2 x backward)
PLAIN_FLOPS_PER_PARAM_TOKEN = 6  # 2 x (forward + 2 x backward)

@dataclass(frozen=True)
class ParameterGroups:
    """Where a Bloom model's parameters sit: what a pipeline's stages and the memory model need."""

    embedding: int  # word embeddings (also the tied LM head), learned positions, embedding LayerNorm
    per_block: int  # one transformer block
    num_layers: int
    final_norm: int  # ln_f

    @property
    def total(self) -> int:
        return self.embedding + self.num_layers * self.per_block + self.final_norm


def parameter_groups(model: ModelConfig) -> ParameterGroups:
    """The parameters of the Bloom model this section builds, by group (see count_parameters)."""
    shape = model.shape()
    c = shape.hidden_size
    f = mlp_width(c, model.activation)
    mlp_in = 2 * f if model.activation == "swiglu" else f  # SwiGLU's fused (gate, up) GEMM
    embedding = model.padded_vocab_size * c  # also the LM head (tied)
    if model.position == "learned":
        embedding += shape.seq_length * c
    if model.embedding_layernorm:
        embedding += 2 * c
    block = (
        2 * c  # input_layernorm
        + c * 3 * c + 3 * c  # query_key_value
        + c * c + c  # attention dense
        + 2 * c  # post_attention_layernorm
        + c * mlp_in + mlp_in  # dense_h_to_4h
        + f * c + c  # dense_4h_to_h
    )
    return ParameterGroups(embedding=embedding, per_block=block, num_layers=shape.num_layers, final_norm=2 * c)


def count_parameters(model: ModelConfig) -> int:
    """Parameters of the Bloom model this section builds, the tied LM head counted once
    (as Bloom.num_parameters counts them): embeddings + blocks + final LayerNorm."""
    return parameter_groups(model).total


def training_flops(params: int, tokens: int, recompute: bool = True) -> float:
    """Training FLOPs: (8 with activation recompute, else 6) x params x tokens."""
    _check_positive(params=params, tokens=tokens)
    per = RECOMPUTE_FLOPS_PER_PARAM_TOKEN if recompute else PLAIN_FLOPS_PER_PARAM_TOKEN
    return float(per) * params * tokens


def gpu_hours(params: int, tokens: int, tflops_per_gpu: float, recompute: bool = True) -> float:
    """GPU-hours to train `params` on `tokens` at `tflops_per_gpu` achieved per GPU.
    The paper's example: 200B params, 300B tokens, 150 TFLOP/s -> 888,889."""
    _check_positive(tflops_per_gpu=tflops_per_gpu)
    return training_flops(params, tokens, recompute) / (tflops_per_gpu * 1e12) / 3600.0


def megatron_flops_per_token(model: ModelConfig, recompute: bool = True) -> float:
    """Megatron's count per token (Narayanan et al. 2021; ../shared/PAPER.md):
    24 k l h^2 (1 + s / (6 h) + V / (16 l h)) with k = 4 with recompute, 3 without. It adds what
    k x params leaves out (attention's scores and values, s / 6h) and drops what costs no
    matmul (the embedding lookup, LayerNorms, biases); the planner shows it beside 8N as a
    check. 24 holds for bloomrun's SwiGLU too: its width 8h/3 keeps the MLP's matmuls at 16 h^2."""
    shape = model.shape()
    h, layers, s = shape.hidden_size, shape.num_layers, shape.seq_length
    k = 4 if recompute else 3
    return 24.0 * k * layers * h * h * (1 + s / (6 * h) + model.padded_vocab_size / (16 * layers * h))


def gpu_tflops(gpu: str, override: float | None = None) -> float:
    """Achieved TFLOP/s per GPU: `override` when given, else the table's figure for `gpu`."""
    if override is not None:
        _check_positive(tflops=override)
        return float(override)
    key = gpu.strip().lower()
    if key not in ACHIEVED_TFLOPS:
        raise ValueError(f"gpu: unknown GPU type {gpu!r}; known: {', '.join(sorted(ACHIEVED_TFLOPS))} "
                         "(or give the achieved TFLOP/s yourself)")
    return ACHIEVED_TFLOPS[key]


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:  # also refuses NaN
            raise ValueError(f"{name} must be positive, got {value!r}")
