"""Samples over one dataset and the weighted blend: contents, epochs, proportions, determinism."""

import hashlib
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bloomrun.trainer.data import BlendedSamples, DataError, GPTSamples, MMapIndexedDataset

from .data_helpers import labelled_documents, write_dataset

SEQ = 8


@pytest.fixture
def dataset(tmp_path):
    return MMapIndexedDataset(write_dataset(tmp_path / "lab", labelled_documents(60, seed=3)))


def is_document_contiguous(sample: np.ndarray) -> bool:
    """Every step either continues a document (+1) or starts one (offset 0 of its doc)."""
    steps_ok = (np.diff(sample) == 1) | (sample[1:] % 64 == 0)
    return bool(steps_ok.all())


def test_samples_have_overlapping_windows_covering_the_epoch(dataset):
    samples = GPTSamples(dataset, SEQ, seed=7)
    assert len(samples) == (dataset.num_tokens - 1) // SEQ
    epoch = [samples[i] for i in range(len(samples))]
    assert all(s.dtype == np.int64 and s.shape == (SEQ + 1,) for s in epoch)
    assert all(is_document_contiguous(s) for s in epoch)
    # Chained end to start, the epoch's samples are one stream: each token appears once,
    # except the SEQ-1 shared boundary tokens, and only the short tail is left out.
    by_first = {int(s[0]): s for s in epoch}
    lasts = {int(s[-1]) for s in epoch}
    assert len(by_first) == len(epoch)
    (first,) = set(by_first) - lasts
    stream, token = [], first
    while token in by_first:
        stream.extend(by_first[token][:-1].tolist())
        token = int(by_first[token][-1])
    stream.append(token)
    assert len(stream) == len(samples) * SEQ + 1 == len(set(stream))
    assert dataset.num_tokens - len(stream) < SEQ


def test_every_document_survives_whole_in_the_epoch_stream(tmp_path):
    docs = [np.arange(d * 64, d * 64 + 10) for d in range(30)]  # 300 tokens, SEQ 10: 29 samples
    samples = GPTSamples(MMapIndexedDataset(write_dataset(tmp_path / "w", docs)), 10, seed=1)
    seen = np.unique(np.concatenate([samples[i] for i in range(len(samples))]))
    # Only the final document, partly in the dropped tail, may be cut.
    assert len(seen) >= 291


def test_next_epoch_reshuffles_and_index_wraps(dataset):
    samples = GPTSamples(dataset, SEQ, seed=7)
    n = len(samples)
    epoch0 = np.stack([samples[i] for i in range(n)])
    epoch1 = np.stack([samples[n + i] for i in range(n)])
    assert not np.array_equal(epoch0, epoch1)
    assert all(is_document_contiguous(s) for s in epoch1)
    assert np.array_equal(samples[2 * n + 5], samples[2 * n + 5])


def test_same_seed_same_samples_other_seed_other_order(dataset):
    a, b, c = (GPTSamples(dataset, SEQ, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(a[i], b[i]) for i in range(0, 3 * len(a), 5))
    assert not all(np.array_equal(a[i], c[i]) for i in range(len(a)))


def test_too_small_dataset_is_a_clear_error(tmp_path):
    ds = MMapIndexedDataset(write_dataset(tmp_path / "small", [[1, 2, 3, 4]]))
    with pytest.raises(DataError, match=r"small: 4 tokens is too few for one sample of 9 tokens"):
        GPTSamples(ds, SEQ, seed=0)


def test_sequence_length_one_less_than_tokens_gives_one_sample(tmp_path):
    ds = MMapIndexedDataset(write_dataset(tmp_path / "one", [list(range(9))]))
    samples = GPTSamples(ds, SEQ, seed=0)
    assert len(samples) == 1 and samples[0].tolist() == list(range(9))
    assert samples[1].tolist() == list(range(9))


# ------------------------------------------------------------------------ blend


def megatron_blending_reference(weights, size):
    """helpers.cpp build_blending_indices, written out plainly."""
    weights = np.asarray(weights, float) / np.sum(weights)
    counts = np.zeros(len(weights), np.int64)
    source, position = [], []
    for i in range(size):
        errors = weights * max(i, 1) - counts
        best = int(np.argmax(errors))
        source.append(best)
        position.append(int(counts[best]))
        counts[best] += 1
    return source, position


def make_blend(tmp_path, weights):
    sources = []
    for k, w in enumerate(weights):
        ds = MMapIndexedDataset(write_dataset(tmp_path / f"s{k}", labelled_documents(30, k, base=k * 10000)))
        sources.append((GPTSamples(ds, SEQ, seed=k), w))
    return BlendedSamples(sources)


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1, 2], [0.05, 0.9, 0.05]])
def test_blend_follows_megatrons_rule_and_proportions(tmp_path, weights):
    blend = make_blend(tmp_path, weights)
    n = 20000
    expected_source, expected_position = megatron_blending_reference(weights, n)
    located = [blend.locate(i) for i in range(n)]
    assert [s for s, _ in located] == expected_source
    assert [p for _, p in located] == expected_position
    # Every prefix is within a sample or two of the weights.
    shares = np.asarray(weights) / np.sum(weights)
    one_hot = np.eye(len(weights))[expected_source]
    drift = np.cumsum(one_hot, axis=0) - np.outer(np.arange(1, n + 1), shares)
    assert np.abs(drift).max() <= 2.0


def test_blend_samples_are_the_sources_samples_in_order(tmp_path):
    blend = make_blend(tmp_path, [0.6, 0.4])
    for i in range(50):
        source, position = blend.locate(i)
        assert blend.source_of(i) == source
        assert np.array_equal(blend[i], blend.sources[source][position])
        assert blend[i][0] // 10000 == source  # tokens really come from that corpus
    assert blend.batch([3, 4, 5]).shape == (3, SEQ + 1)


def test_blend_lookup_order_does_not_matter(tmp_path):
    forward, backward = make_blend(tmp_path, [1, 3]), make_blend(tmp_path, [1, 3])
    late = [backward[i] for i in (30000, 5, 12000)]
    assert all(np.array_equal(a, forward[i]) for a, i in zip(late, (30000, 5, 12000)))


def test_blend_pickles_for_data_loader_workers(tmp_path):
    blend = make_blend(tmp_path, [0.5, 0.5])
    expected = blend.batch(list(range(40)))
    clone = pickle.loads(pickle.dumps(blend))
    assert np.array_equal(clone.batch(list(range(40))), expected)


def test_blend_rejects_bad_weights(tmp_path):
    ds = MMapIndexedDataset(write_dataset(tmp_path / "b", labelled_documents(10, 0)))
    with pytest.raises(ValueError, match="positive"):
        BlendedSamples([(GPTSamples(ds, SEQ, 0), 0.0)])


DIGEST_SCRIPT = textwrap.dedent("""
    import hashlib, sys
    import numpy as np
    from bloomrun.trainer.data import BlendedSamples, GPTSamples, MMapIndexedDataset
    sources = [(GPTSamples(MMapIndexedDataset(p), 8, seed=k), w)
               for k, (p, w) in enumerate([(sys.argv[1], 0.7), (sys.argv[2], 0.3)])]
    blend = BlendedSamples(sources)
    print(hashlib.sha256(blend.batch(list(range(0, 3000, 7))).tobytes()).hexdigest())
""")


def test_blend_is_identical_in_another_process(tmp_path):
    prefixes = [write_dataset(tmp_path / f"p{k}", labelled_documents(40, k)) for k in range(2)]
    sources = [(GPTSamples(MMapIndexedDataset(p), 8, seed=k), w)
               for k, (p, w) in enumerate(zip(prefixes, (0.7, 0.3)))]
    here = hashlib.sha256(BlendedSamples(sources).batch(list(range(0, 3000, 7))).tobytes()).hexdigest()
    there = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT, *map(str, prefixes)],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert here == there
