"""Small datasets for the data tests, written with the real writer."""

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
