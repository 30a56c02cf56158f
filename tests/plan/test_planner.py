"""The planner against the paper: BLOOM's shape among the candidates for its budget, the
compute-optimal point and the data-constrained choice by their formulas, every candidate
obeying the rules, rule violations explained."""

import math

import pytest

from bloomrun.plan import planner, rules
from bloomrun.plan.arithmetic import count_parameters, gpu_hours
from bloomrun.plan.fit import Point
from bloomrun.plan.planner import Request, build_plan
from bloomrun.trainer.config import ModelConfig

BLOOM_BUDGET = 18 * 7 * 24 * 384  # 18 weeks x 384 A100-80GB = 1,161,216 GPU-hours
BLOOM_LABEL = "70x14336x112"


def request(**overrides) -> Request:
    fields = dict(gpu_hours=BLOOM_BUDGET, gpu="a100-80gb", tflops=150.0, cluster=rules.Cluster(num_gpus=384))
    return Request(**{**fields, **overrides})


@pytest.fixture(scope="module")
def bloom_plan():
    return build_plan(request(min_tokens=350 * 10**9))


def test_bloom_budget_is_the_papers(bloom_plan):
    assert BLOOM_BUDGET == 1_161_216
    assert bloom_plan.request.budget_flops == pytest.approx(1_161_216 * 3600 * 150e12)


def test_bloom_176b_is_a_candidate_for_its_budget_at_350b_tokens(bloom_plan):
    bloom = {c.label: c for c in bloom_plan.candidates}[BLOOM_LABEL]
    assert bloom.params == 176_247_271_424
    assert bloom.tokens >= 350 * 10**9 and bloom.gpu_hours <= BLOOM_BUDGET
    # It spends the budget: the tokens are C / (8 N), rounded down to whole steps of 2048 x 2048.
    step_tokens = 2048 * 2048
    assert bloom.tokens == int(bloom_plan.request.budget_flops / (8 * bloom.params) // step_tokens) * step_tokens
    assert bloom.days == pytest.approx(bloom.gpu_hours / 384 / 24)
    assert bloom.layout is not None and bloom.memory.fits


def test_every_candidate_obeys_the_rules_and_the_budget(bloom_plan):
    r = bloom_plan.request
    assert len(bloom_plan.candidates) > 50
    for c in bloom_plan.candidates:
        assert rules.shape_violations(c.shape) == [] and rules.layout_violations(c.shape, c.layout, r.cluster) == []
        assert c.memory.fits and c.memory.total_gib <= 0.9 * 80
        assert c.tokens >= r.min_tokens and c.gpu_hours <= r.gpu_hours
        assert c.gpu_hours == pytest.approx(gpu_hours(c.params, c.tokens, 150.0))
        assert c.shape.hidden_size % 1024 == 0 and c.shape.hidden_size // c.shape.num_heads == 128
        assert 64 <= c.shape.hidden_size / c.shape.num_layers <= 256
    sample = bloom_plan.candidates[::25]
    for c in sample:  # the closed form against the config the manifest will carry
        assert c.params == count_parameters(planner.model_config(r, c.shape))


def test_compute_optimal_point_by_formula(bloom_plan):
    c_model = BLOOM_BUDGET * 3600 * 150e12 * 6 / 8
    n_opt = math.sqrt(c_model / (6 * 20))
    target = bloom_plan.compute_optimal
    assert target.params == pytest.approx(n_opt) and target.tokens == pytest.approx(20 * n_opt)
    assert abs(math.log(target.candidate.params / n_opt)) < 0.05
    # 1.25T tokens > 350B: the minimum does not bind, so the compute-optimal model is chosen.
    assert bloom_plan.data_constrained is None and bloom_plan.chosen is target.candidate
    largest = bloom_plan.largest_at_minimum
    assert largest.params == pytest.approx(BLOOM_BUDGET * 3600 * 150e12 / (8 * 350e9))  # 223.9B
    assert largest.candidate.params <= largest.params
    assert largest.candidate.params >= 0.97 * max(c.params for c in bloom_plan.candidates)


def test_data_constrained_choice_when_the_minimum_binds():
    # BigScience's 2022 fit put the optimum at 392B params on 165B tokens (~0.42 tokens per
    # parameter); requiring >= 350B tokens pushed the size down: the largest model that still
    # trains on the minimum.
    plan = build_plan(request(min_tokens=350 * 10**9, tokens_per_param=0.42))
    assert plan.compute_optimal.candidate is None  # 432B cannot reach 350B tokens in the budget
    assert plan.data_constrained is not None and plan.chosen is plan.data_constrained.candidate
    assert plan.chosen.tokens >= 350 * 10**9
    assert 0.97 * 223.9e9 <= plan.chosen.params <= 223.95e9
    assert any("data-constrained: compute-optimal tokens 1.81e+11 < minimum 3.5e+11" in line for line in plan.arithmetic)


def test_data_ceiling_pushes_to_a_larger_model_on_all_the_data():
    plan = build_plan(request(max_tokens=300 * 10**9))
    target = BLOOM_BUDGET * 3600 * 150e12 / (8 * 300e9)
    assert plan.data_constrained.params == pytest.approx(target)
    assert plan.chosen is plan.data_constrained.candidate
    assert plan.chosen.tokens <= 300 * 10**9
    assert all(c.tokens <= 300 * 10**9 for c in plan.candidates)


def test_bloom_on_366b_tokens_costs_the_papers_955650_gpu_hours():
    plan = build_plan(request(max_tokens=366 * 10**9, shapes=((70, 14336, 112),)))
    (bloom,) = plan.asked
    assert bloom.valid and plan.chosen is bloom
    assert bloom.tokens == (366 * 10**9 // (2048 * 2048)) * 2048 * 2048
    assert bloom.gpu_hours == pytest.approx(955_650, rel=1e-3)
    assert any("GPU-hours = 8 x 1.7625e+11 x 3.6600e+11 / (150e12 x 3600) = 955," in line for line in plan.arithmetic)


def test_one_million_a100_hours_gives_a_bloom_like_final_shape():
    plan = build_plan(request(gpu_hours=1_000_000))
    chosen = plan.chosen
    assert chosen is plan.compute_optimal.candidate
    assert chosen.shape.hidden_size % 128 == 0 and chosen.shape.hidden_size // chosen.shape.num_heads == 128
    assert chosen.gpu_hours == pytest.approx(1_000_000, rel=1e-3)
    assert abs(math.log(chosen.params / math.sqrt(1e6 * 3600 * 150e12 * 6 / 8 / 120))) < 0.05
    assert chosen.layout.tp <= 8 and chosen.memory.fits
    assert plan.shown() and chosen in plan.shown()
    assert plan.arithmetic[0] == "budget C = 1,000,000 GPU-hours x 3600 s x 150 TFLOP/s (a100-80gb) = 5.400e+23 FLOPs"


def test_a_shape_that_breaks_rules_is_explained():
    plan = build_plan(request(shapes=((71, 14300, 109), (70, 14336, 112))))
    bad, good = plan.asked
    assert not bad.valid and good.valid and plan.chosen is good
    text = "\n".join(bad.problems)
    assert "hidden divisible by 128 (tensor-core tiles): hidden 14300 = 111 x 128 + 92" in text
    assert "hidden divisible by heads" in text
    assert "layers + 2 divisible by PP" in text and "71 + 2 = 73 is not divisible by PP" in text


def test_a_shape_too_big_for_the_cards_says_so():
    plan = build_plan(request(gpu="a100-40gb", gpu_hours=100_000, cluster=rules.Cluster(num_gpus=8),
                              shapes=((70, 14336, 112),)))
    (bloom,) = plan.asked
    assert not bloom.valid
    assert any(p.startswith("no layout fits a100-40gb: the least memory of") for p in bloom.problems)


def test_pinned_layout_is_used():
    plan = build_plan(request(shapes=((70, 14336, 112),), tp=4, pp=12, micro_batch=2))
    assert str(plan.chosen.layout) == "TP4 PP12 DP8 mb2"
    assert plan.chosen.memory.total_gib == pytest.approx(31.2, abs=0.05)
    assert all(c.layout.pp == 12 for c in plan.candidates)


def test_knobs_of_the_base_model_change_the_counts():
    swiglu = ModelConfig(preset="176b", activation="swiglu", position="learned")
    plan = build_plan(request(model=swiglu, shapes=((70, 14336, 112),)))
    assert plan.asked[0].params == count_parameters(planner.model_config(plan.request, plan.asked[0].shape))
    assert plan.asked[0].params != 176_247_271_424


def test_fit_predicts_each_candidate_at_its_compute():
    points = tuple(Point(c, 60 * c ** -0.05, "r", i) for i, c in enumerate((1e19, 1e20, 1e21, 1e22)))
    plan = build_plan(request(gpu_hours=1_000_000), points)
    assert plan.fit is not None and plan.runs_points == points
    for c in plan.candidates:
        assert c.prediction.loss == pytest.approx(60 * (6 * c.params * c.tokens) ** -0.05, rel=1e-6)
    assert any(line.startswith("predicted loss of the chosen model") for line in plan.arithmetic)
    beyond = math.log10(6 * plan.chosen.params * plan.chosen.tokens / 1e22)
    assert f"that is {beyond:.1f} orders of magnitude beyond the largest fitted point (1.000e+22 FLOPs)" in \
        "\n".join(plan.arithmetic)


@pytest.mark.parametrize("overrides, message", [
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens .* exceeds max_tokens"),
    ({"hidden_multiple": 1000}, "hidden_multiple .* must be a multiple of 128"),
    ({"gpu_hours": 0}, "gpu_hours must be positive"),
    ({"aspect": (300.0, 100.0)}, "aspect must be 0 < min <= max"),
])
def test_bad_requests_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        request(**overrides)


def test_the_models_own_rules_are_named_too():
    rotary = ModelConfig(preset="176b", position="rotary")
    plan = build_plan(request(model=rotary, gpu_hours=10_000, shapes=((30, 1152, 128),)))  # head width 9
    (odd,) = plan.asked
    assert not odd.valid
    assert "model: position 'rotary' needs an even head dimension (hiddenSize / numHeads)" in odd.problems
    assert odd.params == count_parameters(ModelConfig(preset=None, num_layers=30, hidden_size=1152, num_heads=1,
                                                      seq_length=2048, vocab_size=250880, position="rotary"))


def test_the_papers_benchmarked_shapes_are_all_candidates():
    # BigScience benchmarked 176B 70 x 14336 with 64, 112 and 128 heads, 178B 82 x 13312 and
    # 195B 106 x 12288 (64 heads each) on 48 nodes; with head widths 224, 208, 192, 128 and 112
    # every one is a candidate for the paper's budget at >= 350B tokens.
    plan = build_plan(request(min_tokens=350 * 10**9, head_dims=(224, 208, 192, 128, 112)))
    labels = {c.label: c for c in plan.candidates}
    for label in ("70x14336x64", "70x14336x112", "70x14336x128", "82x13312x64", "106x12288x64"):
        assert label in labels, label
    assert round(labels["82x13312x64"].params / 1e9) == 178 and round(labels["106x12288x64"].params / 1e9) == 195
