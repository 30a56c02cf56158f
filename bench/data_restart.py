"""One claim: a restart's time to first sample does not grow with the corpus.

On a synthetic two-source corpus (written with the project's own index writer), each
measurement is a fresh process doing what a restarted trainer's rank 0 does with its data:
`validate_data`, `build_train_samples`, then the first sample at a resume point.
It prints the seconds to the first sample, the process's anonymous RSS (memory a rank owns:
mapped files are shared page cache) and its peak RSS, samples read per second, and the
blend's entries per second.

    # corpora: 1B tokens / 4M documents, and one 10x smaller (two sources each, 60/40)
    python bench/data_restart.py write /tmp/corpus/big --tokens 1000000000 --documents 4000000
    python bench/data_restart.py write /tmp/corpus/small --tokens 100000000 --documents 400000
    # one start, in this process (what `compare` runs in fresh processes)
    python bench/data_restart.py start /tmp/corpus/big --cache /tmp/cache
    # cold and warm starts of both sizes, each in a fresh process; PYTHONPATH picks the code
    python bench/data_restart.py compare /tmp/corpus/small /tmp/corpus/big --cache-root /tmp/caches
    # the blend alone (the table does not depend on the data: any corpus of two sources)
    python bench/data_restart.py blend /tmp/corpus/small --entries 16000000

Runs against an older checkout too (PYTHONPATH=/path/to/old): where the data module has no
cache, `--cache` is ignored and every start is a cold one.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SOURCES = (("a", 0.6), ("b", 0.4))  # two sources blended 60/40, sizes in the same ratio
VOCAB = 50257  # the 1.3B ablation model's vocabulary (uint16 tokens)


# ------------------------------------------------------------------------- corpus


def write(root: Path, tokens: int, documents: int, seed: int = 0) -> None:
    """Two sources holding `tokens` tokens in `documents` documents between them, document
    lengths uniform around the mean, written with IndexedDatasetWriter in 1M-token batches."""
    from bloomrun.trainer.data import IndexedDatasetWriter

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, share in SOURCES:
        num_docs, num_tokens = int(documents * share), int(tokens * share)
        mean = num_tokens // num_docs
        lengths = rng.integers(1, 2 * mean, num_docs)  # about num_tokens in all
        with IndexedDatasetWriter(root / name, np.uint16) as writer:
            bounds = np.concatenate(([0], np.cumsum(lengths)))
            doc = 0
            while doc < num_docs:
                last = int(np.searchsorted(bounds, bounds[doc] + 1_000_000, side="right")) - 1
                last = max(last, doc + 1)
                block = rng.integers(0, VOCAB, int(bounds[last] - bounds[doc]), dtype=np.uint16)
                for d in range(doc, min(last, num_docs)):
                    writer.add_document(block[bounds[d] - bounds[doc]:bounds[d + 1] - bounds[doc]])
                doc = last
        print(f"{root / name}: {num_docs} documents, {int(lengths.sum())} tokens", flush=True)


# ------------------------------------------------------------------------ measure


def rss_kib() -> dict:
    """This process's anonymous resident memory (what a rank owns) and its peak RSS, KiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) for key in ("RssAnon", "VmHWM")}


def data_config(root: Path):
    from bloomrun.trainer.config import DataConfig, DataSource

    return DataConfig(sources=[DataSource(path=str(root / name), weight=w) for name, w in SOURCES], seed=1234)


def cache_kwargs(function, cache: Path | None) -> dict:
    """An older checkout's data module takes no cache folder: then it is not passed."""
    return {"cache_dir": cache} if "cache_dir" in inspect.signature(function).parameters else {}


def start(root: Path, cache: Path | None, seq: int, resume: int, batch: int) -> dict:
    """What rank 0 of a restarted trainer does with its data, timed: the check, the
    pipeline, the first sample at the resume point; then a batch read for the rate."""
    from bloomrun.trainer.data import build_train_samples, validate_data

    cfg = data_config(root)
    before = rss_kib()
    t0, c0 = time.perf_counter(), time.process_time()
    validate_data(cfg, VOCAB, seq, **cache_kwargs(validate_data, cache))
    t1 = time.perf_counter()
    samples = build_train_samples(cfg, seq, **cache_kwargs(build_train_samples, cache))
    first = samples[resume]
    t2, c2 = time.perf_counter(), time.process_time()
    rss = rss_kib()
    t3 = time.perf_counter()
    rows = samples.batch(list(range(resume + 1, resume + 1 + batch)))
    t4 = time.perf_counter()
    assert first.shape == (seq + 1,) and rows.shape == (batch, seq + 1)
    return {"validate_s": t1 - t0, "first_sample_s": t2 - t0, "first_sample_cpu_s": c2 - c0,
            "rss_anon_mib": (rss["RssAnon"] - before["RssAnon"]) / 1024,
            "peak_rss_mib": rss["VmHWM"] / 1024, "samples_per_s": batch / (t4 - t3)}


def blend_rate(root: Path, entries: int) -> dict:
    """Blend table entries per second, by the clock and by this process's CPU time (on a
    shared machine the two differ by the load): a fresh pipeline (no cache) asked for index
    entries - 1."""
    from bloomrun.trainer.data import build_train_samples

    samples = build_train_samples(data_config(root), 2048)
    t0, c0 = time.perf_counter(), time.process_time()
    samples.locate(entries - 1)
    return {"wall": entries / (time.perf_counter() - t0), "cpu": entries / (time.process_time() - c0)}


def fresh(args: list[str]) -> dict:
    """One measurement in a new process (this script's `start`), its JSON line parsed."""
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(roots: list[Path], cache_root: Path, repeats: int, seq: int, resume: int, batch: int, blend: int) -> None:
    from bloomrun.trainer import data

    code = Path(data.__file__).resolve().parents[3]  # the checkout measured
    rate = fresh(["blend", str(roots[0]), "--entries", str(blend)])
    print(json.dumps({"code": str(code), "blend_entries_per_s": rate}), flush=True)
    common = ["--seq", str(seq), "--resume", str(resume), "--batch", str(batch)]
    caches = {root: cache_root / root.name for root in roots}
    runs = {}  # (root, kind) -> measurements
    for root, cache in caches.items():
        shutil.rmtree(cache, ignore_errors=True)
        runs[root, "cold"] = [fresh(["start", str(root), "--cache", str(cache), *common])]
    for _ in range(repeats):  # the sizes take turns, so a change in the machine's load hits both
        for root, cache in caches.items():
            runs.setdefault((root, "warm"), []).append(fresh(["start", str(root), "--cache", str(cache), *common]))
    for (root, kind), picked in runs.items():
        summary = {key: statistics.median(r[key] for r in picked) for key in picked[0]}
        summary["first_sample_min_s"] = min(r["first_sample_s"] for r in picked)
        print(json.dumps({"corpus": str(root), "start": kind, "runs": len(picked), **summary}), flush=True)
    for cache in caches.values():
        shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("root", type=Path)
    w.add_argument("--tokens", type=int, required=True)
    w.add_argument("--documents", type=int, required=True)
    for name in ("start", "compare", "blend"):
        p = sub.add_parser(name)
        p.add_argument("roots", type=Path, nargs="+")
        p.add_argument("--cache", type=Path, help="start: the data cache folder")
        p.add_argument("--cache-root", type=Path, default=Path("/tmp/data-restart-cache"))
        p.add_argument("--seq", type=int, default=2048)
        p.add_argument("--resume", type=int, default=1_000_000, help="global sample index of the first sample")
        p.add_argument("--batch", type=int, default=2048, help="samples read for the rate")
        p.add_argument("--repeats", type=int, default=5, help="warm starts per corpus")
        p.add_argument("--entries", type=int, default=4_000_000, help="blend: table entries")
    args = parser.parse_args()
    if args.command == "write":
        write(args.root, args.tokens, args.documents)
    elif args.command == "start":
        print(json.dumps(start(args.roots[0], args.cache, args.seq, args.resume, args.batch)))
    elif args.command == "blend":
        print(json.dumps(blend_rate(args.roots[0], args.entries)))
    else:
        compare(args.roots, args.cache_root, args.repeats, args.seq, args.resume, args.batch, args.entries)


if __name__ == "__main__":
    main()
