"""Ties, many sources and the lanes' repair path, against the old loop (test_data_blend's
old_blend, the sequence every earlier run trained on) at sizes the loop can do.

Exact ties are where a different order of operations or a different tie rule would show:
weights drawn from a few small integers make equal weights and rational ratios (every
q-th index ties), and random floats make ties only where rounding decides them."""

import numpy as np
import pytest

from bloomrun.trainer.data import blend
from bloomrun.trainer.data.blend import blend_codes, decode, normalise

from .test_data_blend import old_blend


def random_weights(rng, num):
    """Half the draws from {1, 2, 3, 4} (equal weights, ratios with small denominators:
    exact ties), half uniform floats, sometimes one tiny source."""
    if rng.random() < 0.5:
        weights = rng.integers(1, 5, num).astype(float)
    else:
        weights = rng.random(num) + 1e-3
    if rng.random() < 0.2:
        weights[rng.integers(num)] = 1e-4
    return weights.tolist()


def assert_same_as_old_loop(weights, size, starts):
    want_source, want_position = old_blend(weights, size)
    w = normalise(weights)
    for start in (0, *starts):
        before = np.bincount(want_source[:start], minlength=len(weights))
        codes, counts = blend_codes(w, start, size, before)
        source, position = decode(codes)
        assert np.array_equal(source, want_source[start:]), (weights, start, np.flatnonzero(source != want_source[start:])[:5])
        assert np.array_equal(position, want_position[start:]), (weights, start)
        assert counts.tolist() == np.bincount(want_source, minlength=len(weights)).tolist()


@pytest.mark.parametrize("seed", range(12))
def test_random_weights_with_ties_match_the_old_loop(seed):
    rng = np.random.default_rng(seed)
    num = int(rng.integers(2, 13))
    size = int(rng.integers(8_000, 25_000)) if num <= 4 else int(rng.integers(4_000, 10_000))
    assert_same_as_old_loop(random_weights(rng, num), size, sorted(rng.integers(1, size, 3).tolist()))


@pytest.mark.parametrize("weights", [[1] * 40, list(range(1, 41)), np.random.default_rng(7).random(64).tolist(),
                                     [1] * 300], ids=["40-equal", "40-ramp", "64-random", "300-equal"])
def test_many_sources_match_the_old_loop(weights):
    """Dozens of sources (a corpus per language), and more than 255 (the winner's rank no
    longer fits a byte)."""
    size = 3_000 if len(weights) > 100 else 6_000
    assert_same_as_old_loop(weights, size, [1, 2, size // 3 + 1])


def test_wrong_guesses_are_repaired(monkeypatch):
    """Every lane after the first starts from counts that are wrong (each guess moved by
    one sample between two sources, still summing to the index): the chain check must find
    them, the reruns must fix them, and the table must still be the old loop's."""
    real_guess = blend._guess

    def bad_guess(weights, first):
        guess = real_guess(weights, first)
        guess[0] += 1
        guess[-1] -= 1
        return guess

    reruns = []
    real_step = blend._step
    monkeypatch.setattr(blend, "_guess", bad_guess)
    monkeypatch.setattr(blend, "_step", lambda *args: reruns.append(args[-1] is not None) or real_step(*args))
    for weights in ([1, 2, 3], [1, 1, 1, 1], [1e-3, 1]):  # two sources: their first 1000 indices
        reruns.clear()
        assert_same_as_old_loop(weights, 12_000, [3])
        assert any(reruns)  # the repair path ran


def test_a_lane_that_never_joins_is_rerun_to_its_end(monkeypatch):
    """Too few checkpoints to join early (one: the lane's end): a rerun then replaces the
    whole lane, and the next lane is checked against the new end."""
    monkeypatch.setattr(blend, "_CHECKPOINTS", 1)
    real_guess = blend._guess
    monkeypatch.setattr(blend, "_guess", lambda w, first: real_guess(w, first)[::-1].copy()
                        if len(w) == 3 else real_guess(w, first))
    assert_same_as_old_loop([1, 2, 3], 9_000, [5])


def test_blocks_chain_like_the_cache_builds_them():
    """BlendedSamples builds block after block from the counts the last one returned."""
    for weights in ([1, 1, 1], [0.5, 0.5], list(range(1, 9))):
        size, block = 20_000, 3_000
        want_source, want_position = old_blend(weights, size)
        w, counts, parts = normalise(weights), np.zeros(len(weights), np.int64), []
        for start in range(0, size, block):
            codes, counts = blend_codes(w, start, min(size, start + block), counts)
            parts.append(codes)
        source, position = decode(np.concatenate(parts))
        assert np.array_equal(source, want_source) and np.array_equal(position, want_position)


@pytest.mark.parametrize("weights", [[1, 1, 1], [0.6, 0.3, 0.1], list(range(1, 9)), [1] * 8])
@pytest.mark.parametrize("start", [10**6 + 3, 3 * 10**8, 2**33 + 5])
def test_lanes_agree_with_the_rule_far_into_the_run(weights, start):
    """Far in (where products are coarsest), from counts that sum to the index (the lanes'
    own guess): the rule stepped by the old loop's code must give what the lanes give."""
    w = normalise(weights)
    counts = blend._guess(w, np.array([start])).astype(np.int64)[:, 0]
    got, got_counts = blend_codes(w, start, start + 6000, counts)
    stepped = np.empty(6000, np.int64)
    stepped_counts = blend._general(w, start, start + 6000, counts, stepped)
    assert np.array_equal(got, stepped) and got_counts.tolist() == stepped_counts.tolist()


def test_two_sources_fall_back_to_lanes_when_the_closed_form_check_fails(monkeypatch):
    """A block whose threshold steps by more than one (products so coarse that T can fall:
    a tiny weight far into a run) is refused by the closed form and stepped on lanes; the
    table must not change."""
    monkeypatch.setattr(blend, "_two_sources", lambda *args: None)
    for weights in ([0.5, 0.5], [0.6, 0.4], [0.3141, 0.6859]):
        assert_same_as_old_loop(weights, 20_000, [3, 4097])
