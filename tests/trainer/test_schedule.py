import math

import pytest

from bloomrun.trainer.config import OptimConfig, RampUp, TrainingConfig
from bloomrun.trainer.data import global_batch_size_at
from bloomrun.trainer.schedule import decay_tokens, learning_rate, run_length

PAPER = OptimConfig()  # lr 2e-4, min 1e-5, warmup 375M tokens


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
    training = TrainingConfig(globalBatchSize=64, microBatchSize=4, trainTokens=64 * 100 * 10,
                              rampup=RampUp(start=16, increment=16, samples=600))
    steps, tokens = run_length(training, 10, global_batch_size_at)
    # Samples are consumed 16 at a time, then 32, 48 and 64 as the ramp advances.
    samples, expected_steps = 0, 0
    while samples * 10 < 64_000:
        samples += global_batch_size_at(samples, training)
        expected_steps += 1
    assert (steps, tokens) == (expected_steps, samples * 10)
    assert steps > 64_000 // (64 * 10), "the ramp makes early steps smaller, so there are more of them"


def test_run_length_by_steps_and_default_decay_is_the_whole_run():
    training = TrainingConfig(globalBatchSize=8, microBatchSize=2, trainSteps=7)
    steps, tokens = run_length(training, 32, global_batch_size_at)
    assert (steps, tokens) == (7, 7 * 8 * 32)
    assert decay_tokens(OptimConfig(), tokens) == tokens
    assert decay_tokens(OptimConfig(decayTokens=123), tokens) == 123
    assert math.isclose(learning_rate(tokens, OptimConfig(warmupTokens=0), tokens), 1e-5)
