"""BLOOM's shape rules: the paper's layout obeys them, and each broken rule is named."""

import pytest

from bloomrun.plan import rules
from bloomrun.plan.rules import Cluster, Layout, layout_violations, layouts, shape_violations
from bloomrun.trainer.config import PRESETS, Shape

BLOOM = PRESETS["176b"]  # 70 x 14336, 112 heads
BLOOM_CLUSTER = Cluster(num_gpus=384, gpus_per_node=8, global_batch=2048, zero_stage=1)
BLOOM_LAYOUT = Layout(tp=4, pp=12, dp=8, micro_batch=2)


def names(violations):
    return [v.rule.name for v in violations]


def test_bloom_176b_in_its_own_layout_breaks_no_rule():
    assert shape_violations(BLOOM) == []
    assert layout_violations(BLOOM, BLOOM_LAYOUT, BLOOM_CLUSTER) == []
    assert BLOOM_LAYOUT in layouts(BLOOM, BLOOM_CLUSTER)
    # The benchmarked alternatives of the paper's table obey them too (64 and 128 heads).
    for heads in (64, 128):
        alternative = Shape(70, 14336, heads, 2048, 250880)
        assert layout_violations(alternative, BLOOM_LAYOUT, BLOOM_CLUSTER) == [], heads


def test_each_rule_is_named_with_its_numbers():
    shape = Shape(num_layers=71, hidden_size=14300, num_heads=109, seq_length=2048, vocab_size=250880)
    assert names(shape_violations(shape)) == ["hidden-tiles", "hidden-heads"]
    assert "hidden 14300 = 111 x 128 + 92" in str(shape_violations(shape)[0])
    found = layout_violations(shape, Layout(tp=16, pp=12, dp=2, micro_batch=1), BLOOM_CLUSTER)
    assert names(found) == ["hidden-tp", "fused-softmax", "pipeline-stages", "tp-in-node"]
    assert "71 + 2 = 73 is not divisible by PP 12" in str(found[2])
    assert "TP 16 > 8 GPUs per node" in str(found[3])


def test_fused_softmax_counts_heads_per_tp_times_micro_batch():
    # 112 heads / TP 8 = 14 heads per GPU: micro-batch 1 gives 14, not a multiple of 4; 2 gives 28.
    bad = layout_violations(BLOOM, Layout(tp=8, pp=12, dp=4, micro_batch=1), BLOOM_CLUSTER)
    assert names(bad) == ["fused-softmax"]
    assert "(112 / 8) x 1 = 14" in str(bad[0])
    assert layout_violations(BLOOM, Layout(tp=8, pp=12, dp=4, micro_batch=2), BLOOM_CLUSTER) == []


def test_gpu_count_global_batch_and_zero_with_pipeline():
    found = layout_violations(BLOOM, Layout(tp=4, pp=12, dp=7, micro_batch=2), BLOOM_CLUSTER)
    assert names(found) == ["gpu-count", "global-batch"]
    assert "2048 / (2 x 7) is not whole" in str(found[1])
    zero3 = Cluster(num_gpus=384, zero_stage=3)
    assert names(layout_violations(BLOOM, BLOOM_LAYOUT, zero3)) == ["zero-pipeline"]
    assert all(layout.pp == 1 for layout in layouts(BLOOM, zero3))


def test_a_node_holds_whole_pipeline_replicas():
    # TP2 x PP3 = 6 ranks neither divides a node of 8 nor fills whole nodes; TP8 x PP3 = 24 fills 3.
    found = layout_violations(BLOOM, Layout(tp=2, pp=3, dp=64, micro_batch=2), BLOOM_CLUSTER)
    assert names(found) == ["whole-nodes"] and "TP 2 x PP 3 = 6 with 8 GPUs per node" in str(found[0])
    assert layout_violations(BLOOM, Layout(tp=8, pp=3, dp=16, micro_batch=2), BLOOM_CLUSTER) == []
    small = Cluster(num_gpus=8, gpus_per_node=8, global_batch=64)
    assert layout_violations(Shape(22, 2048, 16, 2048, 50257), Layout(tp=2, pp=2, dp=2, micro_batch=2), small) == []


def test_layouts_are_exactly_the_rule_abiding_ones():
    found = layouts(BLOOM, BLOOM_CLUSTER)
    assert found and all(layout_violations(BLOOM, layout, BLOOM_CLUSTER) == [] for layout in found)
    # 384 GPUs = 2^7 x 3 and a power-of-two batch: DP is a power of two, so PP carries the 3,
    # and 70 + 2 = 72 allows PP 3, 6, 12, 24.
    assert {layout.pp for layout in found} == {3, 6, 12, 24}
    pinned = layouts(BLOOM, BLOOM_CLUSTER, tp=4, pp=12, micro_batch=2)
    assert pinned == [BLOOM_LAYOUT]


def test_explain_no_layout_names_the_rules_that_refuse():
    shape = Shape(num_layers=71, hidden_size=14336, num_heads=112, seq_length=2048, vocab_size=250880)
    assert layouts(shape, BLOOM_CLUSTER) == []  # 73 is prime: only PP 1, which the batch's DP refuses
    lines = rules.explain_no_layout(shape, BLOOM_CLUSTER)
    assert any(line.startswith("layers + 2 divisible by PP") for line in lines)
    assert any(line.startswith("global batch divisible by micro-batch x DP") for line in lines)


@pytest.mark.parametrize("n, expected", [(1, [1]), (12, [1, 2, 3, 4, 6, 12]), (49, [1, 7, 49])])
def test_divisors(n, expected):
    assert rules.divisors(n) == expected
