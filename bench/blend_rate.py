"""One claim: the blend table is built at >= 50M entries per CPU-second for 2, 3 and 8
sources, with weights that tie exactly and weights that do not, and it is the old loop's.

Each case builds the table of `--entries` indices the way BlendedSamples does (blocks of
2^20, each from the counts the last one returned; nothing cached, nothing kept) and prints
one JSON line: CPU seconds per entry (this process's CPU time: on a shared machine the
clock also counts other processes' turns), entries per CPU-second, and the same by the
clock. Before timing, the first `--check` indices of each case are compared with the old
Python loop (tests/trainer/test_data_blend.py's reference), index for index.

    python bench/blend_rate.py --entries 100000000
    python bench/blend_rate.py --entries 10000000 --cases 8-untied 8-tied-ramp
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's bloomrun and tests

from bloomrun.trainer.data.blend import blend_codes, normalise  # noqa: E402
from tests.trainer.test_data_blend import old_blend  # noqa: E402

BLOCK = 1 << 20  # BlendedSamples.BLOCK
CASES = {  # tied: exact ties between lags recur (equal weights, small rational ratios)
    "2-tied-0.5/0.5": [0.5, 0.5],
    "2-tied-0.6/0.4": [0.6, 0.4],
    "2-untied": [0.3141, 0.6859],
    "3-tied-1/1/1": [1, 1, 1],
    "3-tied-0.6/0.3/0.1": [0.6, 0.3, 0.1],
    "3-untied": [0.2718, 0.3141, 0.4141],
    "8-tied-equal": [1] * 8,
    "8-tied-ramp": list(range(1, 9)),
    "8-untied": np.random.default_rng(2026).random(8).round(6).tolist(),
}


def check(weights, size: int) -> None:
    want_source, want_position = old_blend(weights, size)
    codes, _ = blend_codes(normalise(weights), 0, size, np.zeros(len(weights)))
    assert np.array_equal(codes & 1023, want_source) and np.array_equal(codes >> 10, want_position), weights


def rate(weights, entries: int) -> dict:
    w, counts = normalise(weights), np.zeros(len(weights), np.int64)
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, entries, BLOCK):
        _, counts = blend_codes(w, start, min(entries, start + BLOCK), counts)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    assert counts.sum() == entries
    return {"cpu_s_per_entry": cpu / entries, "entries_per_cpu_s": entries / cpu, "entries_per_s": entries / wall,
            "cpu_s": cpu, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000_000)
    parser.add_argument("--check", type=int, default=50_000, help="indices compared with the old loop first")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()
    for name in args.cases:
        if args.check:
            check(CASES[name], args.check)
        print(json.dumps({"case": name, "weights": CASES[name], "entries": args.entries,
                          "checked": args.check, **rate(CASES[name], args.entries)}), flush=True)


if __name__ == "__main__":
    main()
