"""The paper's cost arithmetic (bloomrun/plan/arithmetic.py) against its own figures and
against the built model's parameter count."""

import itertools
import subprocess
import sys

import pytest
import torch

from bloomrun.plan import arithmetic
from bloomrun.plan.arithmetic import count_parameters, gpu_hours, gpu_tflops, training_flops
from bloomrun.trainer.config import PRESETS, ModelConfig
from bloomrun.trainer.model import Bloom, ModelArgs

# The released bigscience/bloom-* checkpoints (tied head counted once), as tests/trainer has them.
RELEASED = {
    "560m": 559_214_592,
    "1b1": 1_065_314_304,
    "3b": 3_002_557_440,
    "7b1": 7_069_016_064,
    "176b": 176_247_271_424,
}


def built_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only: 176B allocates nothing
        return Bloom(ModelArgs.from_config(cfg)).num_parameters()


def test_presets_equal_the_released_bloom_counts():
    for preset, count in RELEASED.items():
        assert count_parameters(ModelConfig(preset=preset)) == count, preset


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_closed_form_equals_the_built_model_for_every_knob(preset):
    knobs = itertools.product(("alibi", "rotary", "learned", "none"), (True, False), ("gelu", "swiglu"))
    for position, embedding_ln, activation in knobs:
        cfg = ModelConfig(preset=preset, position=position, embedding_layernorm=embedding_ln,
                          activation=activation)
        assert count_parameters(cfg) == built_count(cfg), (preset, position, embedding_ln, activation)


def test_closed_form_equals_the_built_model_at_odd_small_shapes():
    # An unpadded vocabulary, SwiGLU widths that round up and down, one layer, one head.
    for layers, hidden, heads, vocab, seq in [(1, 8, 1, 2, 2), (3, 96, 3, 1000, 17), (2, 200, 5, 50257, 64)]:
        for activation, position in [("swiglu", "learned"), ("gelu", "rotary")]:
            cfg = ModelConfig(preset=None, num_layers=layers, hidden_size=hidden, num_heads=heads,
                              vocab_size=vocab, seq_length=seq, activation=activation, position=position,
                              embedding_layernorm=layers % 2 == 1)
            assert count_parameters(cfg) == built_count(cfg), (layers, hidden, activation)


def test_the_papers_worked_example():
    # 200B params on 300B tokens at 150 TFLOP/s = 888,889 GPU-hours (8 = with recompute).
    assert round(gpu_hours(200 * 10**9, 300 * 10**9, 150.0)) == 888_889
    assert training_flops(200 * 10**9, 300 * 10**9) == 8 * 200e9 * 300e9
    # BLOOM itself, 176.2B params on 366B tokens: ~955,650.
    assert gpu_hours(RELEASED["176b"], 366 * 10**9, 150.0) == pytest.approx(955_650, rel=2e-3)
    # Without recompute, 6 instead of 8.
    assert gpu_hours(200 * 10**9, 300 * 10**9, 150.0, recompute=False) == pytest.approx(888_888.9 * 6 / 8)


def test_gpu_table_lookup_and_override():
    assert gpu_tflops("a100-80gb") == 150.0  # the paper's figure
    assert gpu_tflops("A100-80GB") == 150.0
    assert gpu_tflops("h100-80gb", override=412.5) == 412.5
    assert set(arithmetic.ACHIEVED_TFLOPS) >= {"a100-40gb", "a100-80gb", "h100-80gb", "h200"}
    with pytest.raises(ValueError, match=r"unknown GPU type 'v100'.*a100-40gb, a100-80gb, h100-80gb, h200"):
        gpu_tflops("v100")
    with pytest.raises(ValueError, match="tflops must be positive"):
        gpu_tflops("a100-80gb", override=0)


def test_bad_sizes_are_refused_by_name():
    with pytest.raises(ValueError, match="params must be positive"):
        training_flops(0, 10)
    with pytest.raises(ValueError, match="tokens must be positive"):
        gpu_hours(10, -1, 150.0)
    with pytest.raises(ValueError, match="tflops_per_gpu must be positive"):
        gpu_hours(10, 10, float("nan"))


def test_the_arithmetic_does_not_import_torch():
    # The operator's BloomStudy budget check imports it, and the operator stays torch-free.
    code = "import sys, bloomrun.plan.arithmetic; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_megatrons_count_is_within_a_few_percent_of_8n_at_bloom_scale():
    bloom = ModelConfig(preset="176b")
    h, layers, s, v = 14336, 70, 2048, 250880
    by_hand = 24 * 4 * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))
    assert arithmetic.megatron_flops_per_token(bloom) == pytest.approx(by_hand)
    assert arithmetic.megatron_flops_per_token(bloom, recompute=False) == pytest.approx(by_hand * 3 / 4)
    # Attention's scores add ~2.4%, the embedding lookup that 8N counts but costs no matmul ~2%.
    assert arithmetic.megatron_flops_per_token(bloom) / (8 * RELEASED["176b"]) == pytest.approx(1.018, abs=0.002)
