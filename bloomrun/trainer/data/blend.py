"""Megatron's blending rule, computed a block at a time with numpy instead of a step at a time.

The rule (helpers.cpp, build_blending_indices): with weights w summing to 1 and c_s(i) the
samples source s gave before global index i, index i goes to

    argmax_s  w_s * max(i, 1) - c_s(i)          (ties to the lower s)

and is that source's sample number c_s(i). The reference is a Python loop over i and s in
float64 (`_general`, kept for indices 0 and 1, which share a scale); this module returns
the same sequence, bit for bit, including every tie that float rounding decides:

- Two sources, in closed form, wherever both products w_s * i are at least 1 (all but the
  first 1 / min(w) indices). For i >= 1 the counts sum to i, so source 0 wins at i exactly
  when P(i, k) holds for its count k, P(i, k) = [a - k >= b - (i - k)] with a = fl(w_0 i),
  b = fl(w_1 i) as the reference rounds them. Both subtractions are exact there (a and k
  are multiples of a's ulp <= 1 and their difference is small), so P(i, k) is the exact
  2k <= a - b + i and its threshold T(i) = max{k : P(i, k)} is
  floor((n - [frac(a) < frac(b)]) / 2) with n = floor(a) - floor(b) + i: integers and an
  exact comparison, no tolerance, ties included. When T never steps by more than one,
  c_0(i + 1) = T(i) + 1 (induction: if c_0(i) = T(i-1) + 1, source 0 wins at i iff T
  stepped); the step condition is checked on every block, and a block that fails it
  (never seen) takes the general path.
- Any number of sources (and two sources' first indices): the rule itself, stepped in
  lockstep on many lanes at once. The block is cut into lanes of consecutive indices; lane
  0 starts from the known counts, every other lane from a guess (each source's w_s i
  rounded so the counts sum to i: up for the largest lags one index earlier). Each step
  evaluates the rule with the reference's own float operations for all lanes in a few
  numpy calls. A lane whose guess was wrong still follows the rule, and two runs of the
  rule that reach the same counts at the same index agree from there on; the greedy rule
  forgets its start within tens of steps, so a wrong guess usually shows only in the
  lane's first steps. Then the chain is checked: a lane is right iff its start equals the
  previous lane's end. Each mismatched lane is run again from that end, but only until
  its counts equal the first run's at a checkpoint (the rest is already right), and the
  check repeats until the chain holds (the first mismatch moves on every round, so it
  ends). Nothing is trusted that the rule did not produce from the true counts. The cost
  is a few passes over (sources x lanes) a step: it grows with the number of sources.

Either way a block is a pure function of (weights, first index, counts at that index).
"""

from __future__ import annotations

import numpy as np

SOURCE_BITS = 10
MAX_SOURCES = 1 << SOURCE_BITS  # the config allows 1024 sources: each code's low 10 bits
_CHUNK = 1 << 16  # two sources: arrays of 512 KB, which stay in the CPU's cache between passes
_LANE_CELLS = 1 << 15  # lanes x sources per lockstep step: a step's arrays (~0.6 MB) fit the cache
_MIN_LANE = 64  # lanes are at least this many steps, so a guess has room to be forgotten
_CHECKPOINTS = 8  # counts kept per lane to join a rerun to the first run
_TILE = 64  # lanes transposed at a time


def normalise(weights) -> np.ndarray:
    """The weights as the rule uses them: float64, divided by their sum (numpy's sum)."""
    weights = np.array([float(w) for w in weights])
    if len(weights) == 0:
        raise ValueError("a blend needs at least one source")
    if len(weights) > MAX_SOURCES:
        raise ValueError(f"a blend takes at most {MAX_SOURCES} sources, got {len(weights)}")
    if np.any(weights <= 0) or not np.all(np.isfinite(weights)):
        raise ValueError(f"blend weights must be positive and finite, got {weights.tolist()}")
    return weights / weights.sum()


def encode(source: np.ndarray, position: np.ndarray) -> np.ndarray:
    """One int64 per index: the position within its source, shifted, or-ed with the source."""
    return (position.astype(np.int64) << SOURCE_BITS) | source.astype(np.int64)


def decode(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return codes & (MAX_SOURCES - 1), codes >> SOURCE_BITS


def blend_codes(weights: np.ndarray, start: int, stop: int, counts) -> tuple[np.ndarray, np.ndarray]:
    """encode(source, position) of global indices [start, stop), and each source's count at
    `stop`; `counts` is what each source gave before `start` (zeros at 0). `weights` come
    from normalise()."""
    counts = np.array(counts, dtype=np.int64)
    out = np.empty(max(stop - start, 0), np.int64)
    i = start
    while i < stop:
        view = out[i - start:]
        if i < 2:  # 0 and 1 share a scale (max(i, 1)): the reference, one index
            counts = _general(weights, i, i + 1, counts, view[:1])
            i += 1
        elif len(weights) == 1:
            view[:] = encode(np.zeros(stop - i, np.int64), counts[0] + np.arange(stop - i, dtype=np.int64))
            counts = counts + (stop - i)
            i = stop
        elif len(weights) == 2 and weights.min() * (i - 1) >= 1:
            end = min(stop, i + _CHUNK)
            after = _two_sources(weights, i, end, counts, view[:end - i])
            counts = _lanes(weights, i, end, counts, view[:end - i]) if after is None else after
            i = end
        else:  # two sources' first 1 / min(w) indices go up to where the closed form holds
            end = stop if len(weights) > 2 else min(stop, max(i + 1, int(np.ceil(1 / weights.min())) + 2))
            counts = _lanes(weights, i, end, counts, view[:end - i])
            i = end
    return out, counts


def _two_sources(weights, start, stop, counts, out):
    """Writes encode()d [start, stop) into `out` in closed form and returns the counts at
    `stop`; None when a check fails. Needs w_s * (start - 1) >= 1 for both sources. A dozen
    passes over small arrays: this is the two-source blend's hot loop."""
    w0, w1 = weights
    i = np.arange(start - 1, stop, dtype=np.float64)  # T(start - 1) gives c_0(start); exact below 2**53
    a = w0 * i  # the reference's products, rounded as it rounds them
    b = w1 * i
    k = np.floor(a)
    fb = np.floor(b)
    below = (a - k) < (b - fb)  # frac(a) < frac(b): exact (both differences are)
    k -= fb
    k += i
    k -= below
    k *= 0.5
    np.floor(k, out=k)  # T(i) = floor((floor(a) - floor(b) + i - below) / 2)
    stepped = np.diff(k)  # 1 where source 0 wins, else 0 (checked)
    if k[0] + 1 != counts[0] or counts.sum() != start or stepped.min() < 0 or stepped.max() > 1:
        return None
    # code = c_0(i) << 10 where source 0 wins, else (i - c_0(i)) << 10 | 1, c_0(i) = k[i - 1] + 1
    c0 = k[:-1]
    c0 += 1
    other = i[1:] - c0
    other *= MAX_SOURCES
    other += 1  # source 1's code
    c0 *= MAX_SOURCES  # source 0's code
    c0 -= other
    c0 *= stepped
    c0 += other  # source 0's code where it won, source 1's elsewhere
    out[:] = c0  # exact: positions stay far below 2**43
    c0_end = int(k[-1]) + 1
    return np.array([c0_end, stop - c0_end], np.int64)


def _lanes(weights, start, stop, counts, out):
    """Writes encode()d [start, stop), start >= 1, into `out` by the rule stepped on lanes
    (module docstring) and returns the counts at `stop`."""
    num = len(weights)
    n = stop - start
    lanes = 1 << int(np.log2(_LANE_CELLS // num))  # a power of two: blocks fill every lane
    lanes = max(1, min(lanes, n // _MIN_LANE))
    every = -(-n // (lanes * _CHECKPOINTS))  # steps between checkpoints
    steps = every * _CHECKPOINTS
    lanes = -(-n // steps)
    first = start + np.arange(lanes, dtype=np.int64) * steps  # each lane's first index
    begin = _guess(weights, first)  # (sources, lanes) counts at each lane's first index
    begin[:, 0] = counts
    codes = np.empty((steps, lanes))  # step-major while stepping: each step writes a row
    marks = np.empty((_CHECKPOINTS, num, lanes))  # counts after every `every` steps
    _step(weights, first, begin.copy(), every, codes, marks, None)
    while True:  # the chain: lane m is right iff it started from lane m - 1's end
        wrong = np.flatnonzero((begin[:, 1:] != marks[-1][:, :-1]).any(axis=0)) + 1
        if not len(wrong):
            break
        begin[:, wrong] = marks[-1][:, wrong - 1]
        _step(weights, first, begin.copy(), every, codes, marks, wrong)
    # Into index order: transposed a few lanes at a time (a tile stays in the cache), and
    # N added (the steps left it out: see _step).
    whole = lanes * steps == n  # else the last lane ran past `stop`: a table to cut
    table = out.reshape(lanes, steps) if whole else np.empty((lanes, steps), np.int64)
    for m in range(0, lanes, _TILE):
        np.add(codes[:, m:m + _TILE].T, num, out=table[m:m + _TILE], casting="unsafe")
    if not whole:
        out[:] = table.reshape(-1)[:n]
    last = n - (lanes - 1) * steps  # steps of the last lane inside [start, stop)
    tail = np.bincount(out[n - last:] & (MAX_SOURCES - 1), minlength=num)
    return begin[:, -1].astype(np.int64) + tail


def _guess(weights, first):
    """Counts summing to each index in `first`: w_s i rounded down, then up for the sources
    whose lag was largest one index earlier, frac(w_s i) - w_s (the rule's last winners
    are the likeliest to be ahead: right for about 60-100% of lanes where plain largest
    remainders get 50-90%). (sources, lanes), float64."""
    product = weights[:, None] * first.astype(np.float64)
    guess = np.floor(product)
    short = first - guess.sum(axis=0)  # how many sources round up
    order = np.argsort(guess - product + weights[:, None], axis=0, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(len(weights))[:, None], axis=0)
    guess += rank < short
    return guess


def _step(weights, first, counts, every, codes, marks, rerun):
    """Steps the rule on lanes from `counts` (sources, lanes) at indices `first`, writing
    step t of lane m's code less N into codes[t, m] and the counts after every `every`
    steps into `marks`. A rerun (`rerun`: the lanes' numbers) stops a lane where its counts
    meet the marks of the run before: the rest of that lane is already in `codes`. About
    fifteen numpy calls a step, five of them over (sources, lanes)."""
    num = len(weights)
    lanes = np.arange(len(first)) if rerun is None else rerun
    counts = np.ascontiguousarray(counts[:, lanes])
    index = first[lanes].astype(np.float64)
    w = weights[:, None]
    lag = np.empty(counts.shape)
    most = np.empty(len(lanes))
    won = np.empty(counts.shape, bool)
    small = np.uint8 if num < 256 else np.uint16
    rank = np.arange(num, 0, -1, dtype=small)[:, None]  # N - s: the lower source ranks higher
    key = np.empty(counts.shape, small)
    top = np.empty(len(lanes), small)  # N - the winner
    cell = np.empty(len(lanes), np.intp)  # the winner's place in counts.reshape(-1)
    past = np.arange(num * len(lanes), (num + 1) * len(lanes))  # cell + (N - winner) * lanes
    position = np.empty(len(lanes))
    code = np.empty(len(lanes))
    for t in range(every * _CHECKPOINTS):
        np.multiply(w, index, out=lag)
        np.subtract(lag, counts, out=lag)  # the reference's lags, by its float operations
        np.maximum.reduce(lag, axis=0, out=most)
        np.equal(lag, most, out=won)
        # The winner is each lane's first top lag (ties go to the lower source).
        np.multiply(won, rank, out=key)
        np.maximum.reduce(key, axis=0, out=top)
        np.multiply(top, np.intp(len(lanes)), out=cell)
        np.subtract(past, cell, out=cell)
        flat = counts.reshape(-1)
        np.take(flat, cell, out=position)  # the winner's count: its position
        np.multiply(position, MAX_SOURCES, out=code)
        code -= top  # position << 10 | winner, less N; exact: positions stay below 2**43
        position += 1
        flat[cell] = position
        if rerun is None:
            codes[t] = code
        else:
            codes[t, lanes] = code
        index += 1
        if (t + 1) % every == 0:
            mark = marks[(t + 1) // every - 1]
            if rerun is None:
                mark[:] = counts
                continue
            joined = (mark[:, lanes] == counts).all(axis=0)
            keep = ~joined
            mark[:, lanes[keep]] = counts[:, keep]
            if not keep.any():
                return
            if joined.any():
                lanes, index = lanes[keep], index[keep]
                counts = np.ascontiguousarray(counts[:, keep])
                lag, won, key = lag[:, keep], won[:, keep], key[:, keep]
                most, top, cell, position, code = most[keep], top[keep], cell[keep], position[keep], code[keep]
                past = np.arange(num * len(lanes), (num + 1) * len(lanes))


def _general(weights, start, stop, counts, out):
    """Writes encode()d [start, stop) into `out` by the reference loop itself and returns
    the counts at `stop`: exact for any number of sources, about a million indices a second.
    The blend uses it for indices 0 and 1 only; tests step the rule with it."""
    weights, counts = weights.tolist(), counts.tolist()
    num_sources = len(weights)
    source = np.empty(stop - start, np.int64)
    position = np.empty(stop - start, np.int64)
    for i in range(start, stop):
        scale = max(i, 1)
        best, best_lag = 0, weights[0] * scale - counts[0]
        for s in range(1, num_sources):
            lag = weights[s] * scale - counts[s]
            if lag > best_lag:
                best, best_lag = s, lag
        source[i - start] = best
        position[i - start] = counts[best]
        counts[best] += 1
    out[:] = encode(source, position)
    return np.array(counts, np.int64)
