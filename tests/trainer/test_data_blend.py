"""The blend table computed a block at a time (blend.py) is the old step-at-a-time loop's,
index for index, for many weights and sizes, from any starting point."""

import math
from fractions import Fraction

import numpy as np
import pytest

from bloomrun.trainer.data import BlendedSamples, GPTSamples, IndexCache, MMapIndexedDataset
from bloomrun.trainer.data import blend
from bloomrun.trainer.data.blend import blend_codes, decode, normalise

from .data_helpers import labelled_documents, write_dataset


def old_blend(weights, size):
    """BlendedSamples._grow_to as it was before blend.py (commit 4a28a3f), verbatim but for
    the function around it: the sequence every earlier run trained on."""
    weights = np.array([float(w) for w in weights])
    weights = weights / weights.sum()
    counts = [0] * len(weights)
    start = 0
    source = np.empty(size - start, dtype=np.int16)
    position = np.empty(size - start, dtype=np.int64)
    weights, counts = weights.tolist(), counts
    num_sources = len(weights)
    for i in range(start, size):
        scale = max(i, 1)
        best, best_lag = 0, weights[0] * scale - counts[0]
        for s in range(1, num_sources):
            lag = weights[s] * scale - counts[s]
            if lag > best_lag:
                best, best_lag = s, lag
        source[i - start] = best
        position[i - start] = counts[best]
        counts[best] += 1
    return source.astype(np.int64), position


RNG = np.random.default_rng(2026)
TWO = [[0.7, 0.3], [0.3, 0.7], [0.5, 0.5], [0.6, 0.4], [1, 3], [3, 5], [1, 2], [0.999, 0.001],
       [0.001, 0.999], [1e-6, 1], [0.123, 0.877], [1 / 3, 2 / 3]] + [RNG.random(2).tolist() for _ in range(12)]
MORE = [[1], [1, 1, 2], [0.05, 0.9, 0.05], [3, 5, 7, 11], RNG.random(5).tolist(), RNG.random(9).tolist(),
        [1, 1, 1], [0.6, 0.3, 0.1], [1] * 8, list(range(1, 9)), [0.5, 0.25, 0.25], [1e-3, 1, 1]]


@pytest.mark.parametrize("weights", TWO + MORE, ids=lambda w: ",".join(f"{x:.3g}" for x in w))
def test_same_table_as_the_old_loop(weights):
    size = 30_000 if len(weights) == 2 else 6_000
    want_source, want_position = old_blend(weights, size)
    codes, counts = blend_codes(normalise(weights), 0, size, np.zeros(len(weights)))
    source, position = decode(codes)
    assert np.array_equal(source, want_source) and np.array_equal(position, want_position)
    assert counts.tolist() == np.bincount(want_source, minlength=len(weights)).tolist()
    # From a point inside, given the counts there (what a block after the first gets).
    for start in (1, 2, 3, 4097, size // 2 + 1):
        before = np.bincount(want_source[:start], minlength=len(weights))
        codes, _ = blend_codes(normalise(weights), start, size, before)
        assert np.array_equal(decode(codes)[0], want_source[start:]), start
        assert np.array_equal(decode(codes)[1], want_position[start:]), start


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.5], [0.6, 0.4], [0.4, 0.6], [1, 2], [1e-6, 1],
                                     RNG.random(2).tolist()])
@pytest.mark.parametrize("start", [10**6 + 3, 3 * 10**8, 2**33 + 5])
def test_closed_form_agrees_with_the_rule_far_into_the_run(weights, start):
    """Where float rounding is coarsest: the counts at `start` (exact rational arithmetic on
    the reference's rounded products), then the rule stepped by the old loop's code
    (blend._general) must give what the closed form gives."""
    w = normalise(weights)
    counts = counts_at(w, start)
    closed, closed_counts = blend_codes(w, start, start + 5000, counts)
    stepped = np.empty(5000, np.int64)
    stepped_counts = blend._general(w, start, start + 5000, counts, stepped)
    assert np.array_equal(closed, stepped) and closed_counts.tolist() == stepped_counts.tolist()


def counts_at(w, i):
    """Two sources' counts before index i: c_0(i) = T(i - 1) + 1 with T(j) the largest k
    for which source 0 wins at j with count k, a - k >= b - (j - k), a and b the products
    w_s * j as the reference rounds them, compared as exact rationals (not blend.py's way)."""
    j = i - 1
    a, b = Fraction(float(w[0] * j)), Fraction(float(w[1] * j))
    threshold = math.floor((a - b + j) / 2)
    return np.array([threshold + 1, i - threshold - 1])


def test_long_two_source_tables_take_the_closed_form(monkeypatch):
    """What makes two sources fast: every block of a long table is the closed form; only
    indices 0 and 1 (which share a scale) go through the per-index loop, and the indices
    before both products w_s * i reach 1 (here 2 to 4) through the lanes."""
    calls = {"_general": [], "_lanes": []}
    for name in calls:
        real = getattr(blend, name)
        monkeypatch.setattr(blend, name, lambda *args, real=real, name=name: calls[name].append(args[1:3]) or real(*args))
    codes, _ = blend_codes(normalise([0.6, 0.4]), 0, 3 * blend._CHUNK + 17, np.zeros(2))
    assert calls == {"_general": [(0, 1), (1, 2)], "_lanes": [(2, 5)]}
    want_source, want_position = old_blend([0.6, 0.4], 3 * blend._CHUNK + 17)
    assert np.array_equal(decode(codes)[0], want_source) and np.array_equal(decode(codes)[1], want_position)


def test_three_or_more_sources_step_on_lanes_not_the_loop(monkeypatch):
    """More than two sources: the per-index loop only for indices 0 and 1, the rest on lanes."""
    calls = []
    real = blend._general
    monkeypatch.setattr(blend, "_general", lambda *args: calls.append(args[1:3]) or real(*args))
    blend_codes(normalise([1, 2, 3]), 0, 50_000, np.zeros(3))
    assert calls == [(0, 1), (1, 2)]


def test_blended_samples_cross_blocks_and_map_the_cached_table(tmp_path, monkeypatch):
    monkeypatch.setattr(BlendedSamples, "BLOCK", 4096)
    sources = []
    for k in range(2):
        ds = MMapIndexedDataset(write_dataset(tmp_path / f"s{k}", labelled_documents(30, k, base=k * 10000)))
        sources.append((GPTSamples(ds, 8, seed=k), (0.6, 0.4)[k]))
    want_source, want_position = old_blend([0.6, 0.4], 3 * 4096 + 10)
    cache = IndexCache(tmp_path / "cache")
    for _ in range(2):  # cold, then warm: the same table
        blended = BlendedSamples(sources, cache=cache)
        got = [blended.locate(i) for i in range(0, 3 * 4096 + 10, 7)]
        assert got == [(int(want_source[i]), int(want_position[i])) for i in range(0, 3 * 4096 + 10, 7)]
    assert len(list((tmp_path / "cache").glob("blend-*.npy"))) == 4
    assert isinstance(BlendedSamples(sources, cache=cache)._block(2), np.memmap)
    # A resumed process that starts in block 3 builds it from the cached blocks before it.
    for path in (tmp_path / "cache").glob("blend-*.npy"):
        path.unlink()
    late = BlendedSamples(sources, cache=cache)
    assert late.locate(3 * 4096 + 5) == (int(want_source[3 * 4096 + 5]), int(want_position[3 * 4096 + 5]))
