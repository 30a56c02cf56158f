"""Small datasets for the tests (and the benchmarks), written with the real writer: the one
place a test writes a token corpus."""

from pathlib import Path

import numpy as np

from bloomrun.trainer.data import IndexedDatasetWriter


def write_dataset(prefix: Path, documents, dtype=np.uint16) -> Path:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            writer.add_document(doc)
    return prefix


def labelled_documents(num_docs: int, seed: int, base: int = 0, max_len: int = 40):
    """Documents whose tokens say where they come from: doc d holds base + d*64 + j
    (so any window of a sample can be traced back to its documents)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, num_docs)
    return [base + d * 64 + np.arange(n) for d, n in enumerate(lengths)]


def progressions(num_docs: int = 200, seed: int = 0):
    """Learnable documents for trainer runs: arithmetic progressions, so the loss visibly falls."""
    rng = np.random.default_rng(seed)
    for _ in range(num_docs):
        start, stride = int(rng.integers(0, 50)), int(rng.integers(1, 4))
        yield [(start + i * stride) % 1000 for i in range(int(rng.integers(40, 200)))]


def random_documents(num_docs: int, length: int, vocab: int, seed: int = 0):
    """Uniformly random tokens: a corpus for throughput, where what is learnt does not matter."""
    rng = np.random.default_rng(seed)
    for _ in range(num_docs):
        yield rng.integers(0, vocab, length)


def write_corpus(prefix: Path) -> Path:
    """The trainer runs' corpus (tests/trainer/trainer_runs.py): 200 progressions."""
    return write_dataset(prefix, progressions())
