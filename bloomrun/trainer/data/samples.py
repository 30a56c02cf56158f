"""Training samples cut from token datasets, and the weighted blend of several corpora.

A sample is `seq_length + 1` tokens: the model reads the first `seq_length` and predicts
the last `seq_length`. As in Megatron's GPTDataset, one epoch is every sequence of the
dataset concatenated (EOD tokens were appended at prepare time, so documents stay
separated), cut into samples that overlap by one token: sample k is tokens
[k * seq_length, k * seq_length + seq_length + 1) of the concatenation. The tail that
does not fill a sample is dropped. Each epoch has its own document order and its own
sample order, both drawn from (seed, epoch), so index i always names the same tokens on
every rank, in every process, before and after a restart.

The index arrays (each epoch's orders, the blend table) come from an IndexCache (cache.py):
computed once, then memory-mapped by every rank; without a cache folder, in memory.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .blend import blend_codes, decode, normalise
from .cache import IndexCache, file_identity
from .indexed import DataError, MMapIndexedDataset

_DOC_ORDER, _SAMPLE_ORDER = 0, 1  # stream tags, so the two permutations are independent


class GPTSamples:
    """Samples of `seq_length + 1` tokens over one dataset; index i >= len() wraps into
    epoch i // len(), whose shuffle differs from the previous one."""

    def __init__(self, dataset: MMapIndexedDataset, seq_length: int, seed: int, cache: IndexCache | None = None):
        if seq_length < 1:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        self.dataset = dataset
        self.seq_length = seq_length
        self.seed = seed
        num_tokens = dataset.num_tokens
        self.samples_per_epoch = (num_tokens - 1) // seq_length if num_tokens else 0
        if self.samples_per_epoch < 1:
            raise DataError(f"{dataset.prefix}: {num_tokens} tokens is too few for one sample of "
                            f"{seq_length + 1} tokens (seqLength + 1)")
        self.cache = cache or IndexCache(None)
        self._key = {"dataset": file_identity(dataset.prefix), "seed": seed, "seq_length": seq_length}
        self._epoch = lru_cache(maxsize=2)(self._load_epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getstate__(self) -> dict:
        # The epoch cache is rebuilt on demand; data-loader workers get the dataset by path.
        return {k: v for k, v in self.__dict__.items() if k != "_epoch"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._epoch = lru_cache(maxsize=2)(self._load_epoch)

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample i as int64 tokens, shape (seq_length + 1,)."""
        if i < 0:
            raise IndexError(f"sample index {i} is negative")
        epoch, position = divmod(int(i), self.samples_per_epoch)
        doc_order, doc_ends, sample_order = self._epoch(epoch)
        start = int(sample_order[position]) * self.seq_length
        return self._read(doc_order, doc_ends, start, self.seq_length + 1)

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        # PCG64 seeded from a SeedSequence of (seed, epoch, stream): no global state, and the
        # same numbers in every process (numpy keeps this generator's stream stable).
        return np.random.Generator(np.random.PCG64([self.seed, epoch, stream]))

    def _load_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, document ends, sample order) of an epoch: one cached array."""
        docs = len(self.dataset)
        arrays = self.cache.array("epoch", {**self._key, "epoch": epoch}, 2 * docs + self.samples_per_epoch,
                                  lambda: np.concatenate(self._build_epoch(epoch)))
        return arrays[:docs], arrays[docs:2 * docs], arrays[2 * docs:]

    def _build_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        doc_order = self._rng(epoch, _DOC_ORDER).permutation(len(self.dataset))
        doc_ends = np.cumsum(self.dataset.sizes[doc_order], dtype=np.int64)
        sample_order = self._rng(epoch, _SAMPLE_ORDER).permutation(self.samples_per_epoch)
        return doc_order, doc_ends, sample_order

    def _read(self, doc_order: np.ndarray, doc_ends: np.ndarray, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        filled = 0
        # First document whose end lies past `start`; zero-length documents are skipped.
        slot = int(np.searchsorted(doc_ends, start, side="right"))
        while filled < length:
            doc = self.dataset[int(doc_order[slot])]
            doc_start = int(doc_ends[slot]) - len(doc)
            take = doc[start + filled - doc_start:][:length - filled]
            out[filled:filled + len(take)] = take
            filled += len(take)
            slot += 1
        return out


class BlendedSamples:
    """Several sample streams interleaved by weight, deterministically: Megatron's rule
    (blend.py), whose table is cut into blocks of BLOCK indices, each computed once and
    cached (a block's key is the weights and its number: it depends on nothing else)."""

    BLOCK = 1 << 20  # 8 MB of int64 codes a block

    def __init__(self, sources: list[tuple[GPTSamples, float]], names: list[str] | None = None,
                 cache: IndexCache | None = None):
        if not sources:
            raise ValueError("a blend needs at least one source")
        self.sources = [s for s, _ in sources]
        self.weights = normalise([w for _, w in sources])
        self.names = names or [s.dataset.prefix for s in self.sources]
        self.cache = cache or IndexCache(None)
        self._block = lru_cache(maxsize=2)(self._load_block)
        self._counts_before = {0: np.zeros(len(self.sources), np.int64)}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_block"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._block = lru_cache(maxsize=2)(self._load_block)

    def _load_block(self, block: int) -> np.ndarray:
        key = {"weights": self.weights.tolist(), "block": block, "size": self.BLOCK}
        return self.cache.array("blend", key, self.BLOCK, lambda: self._build_block(block))

    def _build_block(self, block: int) -> np.ndarray:
        start = block * self.BLOCK
        codes, counts = blend_codes(self.weights, start, start + self.BLOCK, self._counts_at(block))
        self._counts_before[block + 1] = counts
        return codes

    def _counts_at(self, block: int) -> np.ndarray:
        """Each source's count before the block: the blocks before it, cached or built."""
        if block not in self._counts_before:
            sources, _ = decode(np.asarray(self._block(block - 1)))  # a cached block's
            self._counts_before[block] = self._counts_at(block - 1) + np.bincount(sources, minlength=len(self.sources))
        return self._counts_before[block]

    def locate(self, i: int) -> tuple[int, int]:
        """(source, index within that source) of global sample i."""
        if i < 0:
            raise IndexError(f"sample index {i} is negative")
        block, offset = divmod(int(i), self.BLOCK)
        source, position = decode(int(self._block(block)[offset]))
        return int(source), int(position)

    def source_of(self, i: int) -> int:
        """Which source (index into `sources`) global sample i comes from."""
        return self.locate(i)[0]

    def __getitem__(self, i: int) -> np.ndarray:
        source, position = self.locate(i)
        return self.sources[source][position]

    def batch(self, indices: list[int]) -> np.ndarray:
        """The samples at these global indices stacked: int64 (len(indices), seq_length + 1)."""
        if not indices:
            return np.zeros((0, self.sources[0].seq_length + 1), np.int64)
        return np.stack([self[i] for i in indices])
