"""The data index cache: built once, published atomically, shared safely, mapped, invalidated
by a changed file; validation that scans every token once per file identity."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bloomrun.trainer.config import DataConfig, DataSource
from bloomrun.trainer.data import (
    CACHE_ENV,
    DataError,
    GPTSamples,
    IndexCache,
    MMapIndexedDataset,
    build_train_samples,
    data_cache_dir,
    validate_data,
)
from bloomrun.trainer.data import indexed, sources

from .data_helpers import labelled_documents, write_dataset


def arange_builder(n, log):
    def build():
        log.append(n)
        return np.arange(n)
    return build


def test_array_is_built_once_published_atomically_and_mapped(tmp_path):
    cache, built = IndexCache(tmp_path / "c"), []
    first = cache.array("t", {"x": 1}, 10, arange_builder(10, built))
    again = IndexCache(tmp_path / "c").array("t", {"x": 1}, 10, arange_builder(10, built))
    assert built == [10] and isinstance(again, np.memmap) and np.array_equal(first, again)
    assert not again.flags.writeable
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert [n for n in names if n.endswith(".npy")] and not [n for n in names if n.endswith(".tmp")]
    cache.array("t", {"x": 2}, 10, arange_builder(10, built))  # another key, another file
    assert built == [10, 10]


def test_a_damaged_file_is_rebuilt(tmp_path):
    cache, built = IndexCache(tmp_path), []
    cache.array("t", {"x": 1}, 1000, arange_builder(1000, built))
    (path,) = tmp_path.glob("t-*.npy")
    path.write_bytes(path.read_bytes()[:-800])  # truncated
    assert np.array_equal(cache.array("t", {"x": 1}, 1000, arange_builder(1000, built)), np.arange(1000))
    assert built == [1000, 1000]


BUILDER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from bloomrun.trainer.data import IndexCache
    def build():
        with open(sys.argv[2], "a") as log:
            log.write(f"{os.getpid()}\\n")
        time.sleep(0.5)  # long enough for the others to arrive and wait
        return np.arange(200_000) * 3
    array = IndexCache(sys.argv[1]).array("race", {"k": 1}, 200_000, build)
    print(int(array.sum()))
""")


def test_concurrent_builders_build_once_and_read_whole_files(tmp_path):
    log = tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(tmp_path / "c"), str(log)],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    sums = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sums == [int((np.arange(200_000) * 3).sum())] * 4
    assert len(log.read_text().split()) == 1  # one built; the others waited on its lock


def test_unwritable_cache_folder_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=f"data cache .*file/sub: cannot write there.*{CACHE_ENV}"):
        IndexCache(tmp_path / "file" / "sub").array("t", {}, 3, lambda: np.arange(3))


def test_cache_folder_is_the_launchers_choice_else_beside_the_checkpoints(tmp_path):
    assert data_cache_dir("/ckpt/ns/run/uid", env={}) == tmp_path.joinpath("/ckpt/ns/run/uid/data-cache")
    assert data_cache_dir("/ckpt", env={CACHE_ENV: "/shared/cache"}) == tmp_path.joinpath("/shared/cache")
    assert data_cache_dir(None, env={}) is None


# ------------------------------------------------------------------------ samples


@pytest.fixture
def corpus(tmp_path):
    return write_dataset(tmp_path / "lab", labelled_documents(80, seed=3))


def test_cached_epochs_give_the_samples_built_in_memory(corpus, tmp_path):
    memory = GPTSamples(MMapIndexedDataset(corpus), 8, seed=5)
    cached = GPTSamples(MMapIndexedDataset(corpus), 8, seed=5, cache=IndexCache(tmp_path / "c"))
    indices = range(0, 3 * len(memory), 3)  # three epochs
    assert all(np.array_equal(memory[i], cached[i]) for i in indices)
    assert len(list((tmp_path / "c").glob("epoch-*.npy"))) == 3
    fresh = GPTSamples(MMapIndexedDataset(corpus), 8, seed=5, cache=IndexCache(tmp_path / "c"))
    assert isinstance(fresh._epoch(1)[2], np.memmap)  # mapped, not rebuilt
    assert all(np.array_equal(memory[i], fresh[i]) for i in indices)
    other_seed = GPTSamples(MMapIndexedDataset(corpus), 8, seed=6, cache=IndexCache(tmp_path / "c"))
    other_seed[0]
    assert len(list((tmp_path / "c").glob("epoch-*.npy"))) == 4


def test_a_rewritten_file_gets_new_index_arrays(tmp_path):
    prefix = write_dataset(tmp_path / "d", labelled_documents(40, seed=1))
    cache = IndexCache(tmp_path / "c")
    before = GPTSamples(MMapIndexedDataset(prefix), 8, seed=0, cache=cache)
    before[0]
    write_dataset(prefix, labelled_documents(60, seed=2, base=5000))  # same path, new contents
    after = GPTSamples(MMapIndexedDataset(prefix), 8, seed=0, cache=cache)
    uncached = GPTSamples(MMapIndexedDataset(prefix), 8, seed=0)
    assert all(np.array_equal(after[i], uncached[i]) for i in range(len(uncached)))
    assert len(list((tmp_path / "c").glob("epoch-*.npy"))) == 2


def data_config(*prefixes):
    return DataConfig(sources=[DataSource(path=str(p), weight=1.0) for p in prefixes], seed=3)


def test_build_train_samples_with_a_cache_is_the_same_blend(tmp_path):
    a = write_dataset(tmp_path / "a", labelled_documents(50, seed=1))
    b = write_dataset(tmp_path / "b", labelled_documents(30, seed=2, base=20000))
    cfg = data_config(a, b)
    memory = build_train_samples(cfg, 8)
    for _ in range(2):
        cached = build_train_samples(cfg, 8, cache_dir=tmp_path / "c")
        assert np.array_equal(memory.batch(list(range(0, 2000, 3))), cached.batch(list(range(0, 2000, 3))))


# --------------------------------------------------------------------- validation


@pytest.fixture
def count_scans(monkeypatch):
    """How many times every index entry was checked (the O(corpus) part of a scan)."""
    calls = []
    real = indexed._check_index_arrays
    monkeypatch.setattr(indexed, "_check_index_arrays", lambda idx, *rest: calls.append(idx.name) or real(idx, *rest))
    return calls


def test_full_scan_runs_once_per_file_identity(tmp_path, count_scans):
    a = write_dataset(tmp_path / "a", labelled_documents(50, seed=1))
    cfg = data_config(a)
    validate_data(cfg, vocab_size=4000, seq_length=8, cache_dir=tmp_path / "c")
    validate_data(cfg, vocab_size=4000, seq_length=8, cache_dir=tmp_path / "c")
    build_train_samples(cfg, 8, cache_dir=tmp_path / "c")[0]
    assert count_scans == ["a.idx"]
    (record,) = (json.loads(p.read_text()) for p in (tmp_path / "c").glob("scan-*.json"))
    assert record["num_tokens"] == MMapIndexedDataset(a).num_tokens
    write_dataset(a, labelled_documents(55, seed=4))  # changed: scanned again
    validate_data(cfg, vocab_size=4000, seq_length=8, cache_dir=tmp_path / "c")
    assert count_scans == ["a.idx"] * 3  # the check above opened it fully once more
    validate_data(cfg, vocab_size=4000)  # no cache folder: nothing records it, so every time
    assert count_scans == ["a.idx"] * 4


def test_recorded_scan_still_checks_the_vocabulary(tmp_path, monkeypatch):
    """A later start with a smaller model reads the largest id from the record: a token the
    sample never sees still fails it."""
    monkeypatch.setattr(sources, "SAMPLED_TOKENS", 640)
    tokens = np.zeros(100_000, np.int64)
    tokens[50_003] = 900  # between two sampled blocks
    prefix = write_dataset(tmp_path / "big", [tokens])
    validate_data(data_config(prefix), vocab_size=1000, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="token id 900 is not below the model's vocabSize 500"):
        validate_data(data_config(prefix), vocab_size=500, cache_dir=tmp_path / "c")


def test_a_bad_token_outside_the_sample_is_caught_by_the_first_scan(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SAMPLED_TOKENS", 640)  # 64 blocks of 10 tokens
    tokens = np.zeros(100_000, np.int64)
    tokens[50_003] = 900
    prefix = write_dataset(tmp_path / "big", [tokens])
    assert sources.sampled_tokens(MMapIndexedDataset(prefix).tokens).max() == 0
    with pytest.raises(DataError, match="token id 900 is not below"):
        validate_data(data_config(prefix), vocab_size=500, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # a refused run records nothing
    # A forged record for this very identity: then only the sample is read, and it passes.
    # (What "cheap on every start" means; the record is trusted as long as the file is
    # the same size and modification time.)
    validate_data(data_config(prefix), vocab_size=1000, cache_dir=tmp_path / "c")
    (record,) = (tmp_path / "c").glob("scan-*.json")
    record.write_text(record.read_text().replace('"max_token": 900', '"max_token": 0'))
    validate_data(data_config(prefix), vocab_size=500, cache_dir=tmp_path / "c")


def test_a_refused_run_leaves_no_cache_folder(tmp_path):
    good = write_dataset(tmp_path / "good", labelled_documents(50, seed=1))
    bad = write_dataset(tmp_path / "bad", [np.arange(10) + 9000])
    with pytest.raises(DataError, match=r"data.sources\[1\].*token id 9009"):
        validate_data(data_config(good, bad), vocab_size=4000, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_the_pipeline_opens_files_without_reading_every_entry(tmp_path, count_scans):
    a = write_dataset(tmp_path / "a", labelled_documents(50, seed=1))
    samples = build_train_samples(data_config(a), 8)
    samples[0]
    assert count_scans == []
    # Cheap checks still catch what costs nothing to see: a .bin that lost its tail.
    path = a.with_suffix(".bin")
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"a\.bin: .* bytes, but a\.idx describes"):
        build_train_samples(data_config(a), 8)
