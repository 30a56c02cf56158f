"""The run's schedule: ramp-up, rank slices, run length and learning rate; and resume on
another world size giving the same samples, compared index by index and token by token."""

import math

import numpy as np
import pytest

from bloomrun.trainer.config import DataConfig, DataSource, OptimConfig, RampUp, TrainingConfig
from bloomrun.trainer.data import build_train_samples
from bloomrun.trainer.schedule import (
    decay_tokens,
    global_batch_size_at,
    learning_rate,
    micro_batches,
    rank_sample_indices,
    run_length,
)

from .data_helpers import labelled_documents, write_dataset

PAPER = OptimConfig()  # lr 2e-4, min 1e-5, warmup 375M tokens


def training(**kwargs) -> TrainingConfig:
    return TrainingConfig.model_validate({"trainSteps": 100, **kwargs})


RAMP = training(globalBatchSize=24, microBatchSize=2,
                rampup={"start": 6, "increment": 6, "samples": 90})


def test_rampup_follows_megatron_stages():
    # (24 - 6) / 6 = 3 increments over 90 samples: one every 30 samples.
    expected = {0: 6, 29: 6, 30: 12, 59: 12, 60: 18, 89: 18, 90: 24, 10_000: 24}
    assert {c: global_batch_size_at(c, RAMP) for c in expected} == expected


def test_no_rampup_is_the_global_batch():
    assert global_batch_size_at(0, training(globalBatchSize=16, microBatchSize=4)) == 16


def test_rampup_increment_must_divide_the_span():
    # Refused when the config is read, before any schedule is computed.
    with pytest.raises(ValueError, match=r"globalBatchSize - start \(19\) must be a multiple of increment \(4\)"):
        training(globalBatchSize=24, microBatchSize=1, rampup={"start": 5, "increment": 4, "samples": 10})


def test_run_length_agrees_with_the_ramp():
    # steps of 6 until 30, then 12 until 60, 18 until 90, then 24.
    ramp = {"globalBatchSize": 24, "microBatchSize": 2, "rampup": {"start": 6, "increment": 6, "samples": 90}}
    consumed = [run_length(training(**ramp, trainSteps=k), 1)[1] for k in range(1, 9)]
    assert consumed == [6, 12, 18, 24, 30, 42, 54, 66]
    by_tokens = dict(ramp, trainSteps=None)
    assert run_length(training(**by_tokens, trainTokens=30 * 64), 64) == (5, 30 * 64)
    assert run_length(training(**by_tokens, trainTokens=30 * 64 + 1), 64) == (6, 42 * 64)


def test_ranks_take_contiguous_equal_slices():
    slices = [rank_sample_indices(100, 12, r, 3) for r in range(3)]
    assert slices == [[100, 101, 102, 103], [104, 105, 106, 107], [108, 109, 110, 111]]
    assert micro_batches(slices[1], 2) == [[104, 105], [106, 107]]


@pytest.mark.parametrize("batch,world,micro", [(16, 3, 1), (12, 2, 4), (10, 4, 1)])
def test_indivisible_batch_is_a_clear_error(batch, world, micro):
    with pytest.raises(ValueError, match=f"global batch {batch} is not divisible by world size {world} "
                                         f"x micro-batch {micro}"):
        rank_sample_indices(0, batch, 0, world, micro)


def test_rank_outside_world_is_an_error():
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        rank_sample_indices(0, 8, 2, 2)


def test_warmup_is_linear_in_tokens_and_starts_above_zero():
    assert learning_rate(0, PAPER, 10**11) == 0.0
    assert learning_rate(1, PAPER, 10**11) > 0.0
    assert learning_rate(375_000_000 // 2, PAPER, 10**11) == pytest.approx(1e-4)
    assert learning_rate(375_000_000, PAPER, 10**11) == pytest.approx(2e-4)


def test_cosine_reaches_min_lr_at_decay_end_and_stays_there():
    total = 112_000_000_000
    middle = 375_000_000 + (total - 375_000_000) // 2
    assert learning_rate(middle, PAPER, total) == pytest.approx((2e-4 + 1e-5) / 2, rel=1e-6)
    assert learning_rate(total, PAPER, total) == pytest.approx(1e-5)
    assert learning_rate(2 * total, PAPER, total) == pytest.approx(1e-5)
    rates = [learning_rate(t, PAPER, total) for t in range(375_000_000, total, total // 50)]
    assert all(a >= b for a, b in zip(rates, rates[1:])), "cosine decay must not increase"


def test_run_length_walks_the_rampup():
    cfg = TrainingConfig(globalBatchSize=64, microBatchSize=4, trainTokens=64 * 100 * 10,
                              rampup=RampUp(start=16, increment=16, samples=600))
    steps, tokens = run_length(cfg, 10)
    # Samples are consumed 16 at a time, then 32, 48 and 64 as the ramp advances.
    samples, expected_steps = 0, 0
    while samples * 10 < 64_000:
        samples += global_batch_size_at(samples, cfg)
        expected_steps += 1
    assert (steps, tokens) == (expected_steps, samples * 10)
    assert steps > 64_000 // (64 * 10), "the ramp makes early steps smaller, so there are more of them"


def test_run_length_by_steps_and_default_decay_is_the_whole_run():
    cfg = TrainingConfig(globalBatchSize=8, microBatchSize=2, trainSteps=7)
    steps, tokens = run_length(cfg, 32)
    assert (steps, tokens) == (7, 7 * 8 * 32)
    assert decay_tokens(OptimConfig(), tokens) == tokens
    assert decay_tokens(OptimConfig(decayTokens=123), tokens) == 123
    assert math.isclose(learning_rate(tokens, OptimConfig(warmupTokens=0), tokens), 1e-5)


# ---------------------------------------------------------------- resume


@pytest.fixture
def data_cfg(tmp_path):
    """Two corpora by absolute path (what a launcher's resolver hands the trainer)."""
    write_dataset(tmp_path / "a", labelled_documents(80, seed=1, base=0))
    write_dataset(tmp_path / "b", labelled_documents(50, seed=2, base=20000))
    return DataConfig(sources=[DataSource(path=str(tmp_path / "a"), weight=0.75),
                               DataSource(path=str(tmp_path / "b"), weight=0.25)], seed=11)


# Ramp 12 -> 24 -> 36: every stage divides into micro-batches of 2 on 1, 2, 3 and 6 ranks.
RESUME_RAMP = training(globalBatchSize=36, microBatchSize=2,
                       rampup={"start": 12, "increment": 12, "samples": 100})


def run_steps(data_cfg, consumed, num_steps, world_size, training_cfg=RESUME_RAMP):
    """What a run with `world_size` ranks trains on for `num_steps` steps after `consumed`
    samples: per step, the union of the ranks' indices and the matching token batch. The
    samples are rebuilt from the files, as a restarted process would."""
    samples = build_train_samples(data_cfg, seq_length=8)
    steps = []
    for _ in range(num_steps):
        batch = global_batch_size_at(consumed, training_cfg)
        per_rank = [rank_sample_indices(consumed, batch, r, world_size, training_cfg.micro_batch_size)
                    for r in range(world_size)]
        indices = sorted(i for rank in per_rank for i in rank)
        tokens = np.concatenate([samples.batch(rank) for rank in per_rank])
        steps.append((indices, tokens))
        consumed += batch
    return steps, consumed


def test_resume_on_other_world_sizes_sees_the_same_batches(data_cfg):
    uninterrupted, end = run_steps(data_cfg, 0, 14, world_size=2)
    resumed, consumed = [], 0
    # Killed after 3 steps on 2 ranks, resumed on 1, then on 3, then on 6, then on 2 again.
    for world, num_steps in [(2, 3), (1, 2), (3, 4), (6, 3), (2, 2)]:
        part, consumed = run_steps(data_cfg, consumed, num_steps, world)
        resumed.extend(part)
    assert consumed == end
    assert [i for i, _ in resumed] == [i for i, _ in uninterrupted]
    for step, ((_, want), (_, got)) in enumerate(zip(uninterrupted, resumed)):
        assert np.array_equal(want, got), f"tokens differ at step {step}"
    # Steps never repeat or skip a sample: the indices tile [0, consumed).
    assert sorted(i for idx, _ in uninterrupted for i in idx) == list(range(end))


def test_blend_share_over_a_run(data_cfg):
    samples = build_train_samples(data_cfg, seq_length=8)
    sources = [samples.source_of(i) for i in range(4000)]
    assert abs(sources.count(1) / 4000 - 0.25) < 0.005
    assert samples.names == ["a", "b"]


def test_skipped_ranges_are_jumped_at_their_start_and_not_counted_as_trained():
    from bloomrun.trainer.schedule import samples_trained, skip_past

    ranges = [[24, 48], [48, 56], [100, 108]]
    assert [skip_past(c, ranges) for c in (0, 16, 24, 30, 47, 48, 56, 100, 108)] == [0, 16, 56, 56, 56, 56, 56, 108, 108]
    assert [samples_trained(c, ranges) for c in (16, 24, 40, 56, 72, 108)] == [16, 24, 24, 24, 40, 68]
    assert skip_past(5, []) == 5 and samples_trained(5, []) == 5
