"""The memory model, checked by hand at BLOOM-176B's own layout (TP4 PP12 DP8, micro-batch 2)."""

import pytest

from bloomrun.plan import memory
from bloomrun.plan.arithmetic import parameter_groups
from bloomrun.plan.rules import Layout
from bloomrun.trainer.config import ModelConfig

H, V, L, S, A = 14336, 250880, 70, 2048, 112
BLOCK = 12 * H * H + 13 * H  # QKV, dense, the two MLP matrices, their biases and two LayerNorms
EMBEDDING = V * H + 2 * H  # word embeddings and their LayerNorm
CFG = ModelConfig(preset="176b")
BLOOM_LAYOUT = Layout(tp=4, pp=12, dp=8, micro_batch=2)


def test_groups_add_up_to_the_released_count():
    groups = parameter_groups(CFG)
    assert (groups.embedding, groups.per_block, groups.num_layers) == (EMBEDDING, BLOCK, L)
    assert groups.total == 176_247_271_424


def test_fullest_stage_holds_five_blocks_and_the_embedding_split_over_tp():
    # 72 slots / 12 stages = 6: the first stage is the embedding + 5 blocks, the last 5 blocks +
    # ln_f + the tied head's copy of the embedding, the middle ones 6 blocks.
    last = 5 * BLOCK + EMBEDDING + 2 * H
    assert memory.stage_parameters(parameter_groups(CFG), BLOOM_LAYOUT) == -(-last // 4)
    whole = memory.stage_parameters(parameter_groups(CFG), Layout(tp=1, pp=1, dp=384, micro_batch=1))
    assert whole == 176_247_271_424


@pytest.mark.parametrize("stage, expected", [(0, 1600), (1, 400 + 1200 / 4), (2, 200 + 1400 / 4), (3, 1600 / 4)])
def test_zero_stages_split_optimizer_then_gradients_then_weights(stage, expected):
    assert memory.states_bytes(100, stage, dp=4) == expected


@pytest.mark.parametrize("stage, expected", [(0, 100 * (8 + 12 / 4)), (1, 100 * (8 + 12 / 4)),
                                             (2, 100 * (4 + 16 / 4)), (3, 100 * 16 / 4)])
def test_fsdp2_holds_whole_weights_and_gradients_in_a_step_below_zero_2(stage, expected):
    # trainer/mesh_engine.py: at 0-1 the weights stay gathered and the gradients whole until the
    # last backward; at 2 gradients are reduce-scattered every micro-batch; at 3 weights freed too.
    assert memory.fsdp_states_bytes(100, 4, stage) == pytest.approx(expected)


def test_bloom_layout_by_hand():
    mem = memory.memory_per_gpu(CFG.shape(), parameter_groups(CFG), CFG.padded_vocab_size, BLOOM_LAYOUT,
                                global_batch=2048, zero_stage=1, recompute=True, gpu="a100-80gb")
    params = -(-(5 * BLOCK + EMBEDDING + 2 * H) // 4)
    assert mem.states_bytes == params * (2 + 2 + 12 / 8)
    sbh = S * 2 * H
    full_block = sbh * (10 + 24 / 4 + 5 * A * S / (H * 4))  # Korthikanti et al. eq. 2: 36 sbh here
    kept = 12 * 6 * 2 * sbh  # 12 micro-batches in flight x 6 layers x each layer's bf16 input
    logits = 4 * S * 2 * V / 4
    assert mem.activations_bytes == pytest.approx(kept + full_block + logits)
    assert mem.total_gib == pytest.approx(31.2, abs=0.05)
    assert mem.fits and mem.capacity_gib == 80.0


def test_recompute_keeps_less_and_a_40gb_card_holds_less():
    args = (CFG.shape(), parameter_groups(CFG), CFG.padded_vocab_size, BLOOM_LAYOUT, 2048, 1)
    with_recompute = memory.memory_per_gpu(*args, recompute=True, gpu="a100-80gb")
    without = memory.memory_per_gpu(*args, recompute=False, gpu="a100-80gb")
    assert without.activations_bytes > 5 * with_recompute.activations_bytes
    assert not without.fits  # 72 layers' full activations in flight do not fit 80 GB
    shallow = (CFG.shape(), parameter_groups(CFG), CFG.padded_vocab_size, Layout(tp=4, pp=3, dp=32, micro_batch=1),
               2048, 1)
    on_80 = memory.memory_per_gpu(*shallow, recompute=True, gpu="a100-80gb")
    on_40 = memory.memory_per_gpu(*shallow, recompute=True, gpu="a100-40gb")
    assert on_80.total_gib == on_40.total_gib == pytest.approx(66.8, abs=0.05)
    assert on_80.fits and not on_40.fits  # under 90% of 80 GiB, over 40


def test_unknown_gpu_is_named():
    with pytest.raises(ValueError, match="unknown GPU type 'v100'"):
        memory.gpu_memory_gib("v100")
    assert set(memory.GPU_MEMORY_GIB) == set(__import__("bloomrun.plan.arithmetic").plan.arithmetic.ACHIEVED_TFLOPS)
