"""Training samples cut from token datasets, and the weighted blend of several corpora.

A sample is `seq_length + 1` tokens: the model reads the first `seq_length` and predicts
the last `seq_length`. As in Megatron's GPTDataset, one epoch is every sequence of the
dataset concatenated (EOD tokens were appended at prepare time, so documents stay
separated), cut into samples that overlap by one token: sample k is tokens
[k * seq_length, k * seq_length + seq_length + 1) of the concatenation. The tail that
does not fill a sample is dropped. Each epoch has its own document order and its own
sample order, both drawn from (seed, epoch), so index i always names the same tokens on
every rank, in every process, before and after a restart.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .indexed import DataError, MMapIndexedDataset

_DOC_ORDER, _SAMPLE_ORDER = 0, 1  # stream tags, so the two permutations are independent


class GPTSamples:
    """Samples of `seq_length + 1` tokens over one dataset; index i >= len() wraps into
    epoch i // len(), whose shuffle differs from the previous one."""

    def __init__(self, dataset: MMapIndexedDataset, seq_length: int, seed: int):
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
        self._epoch = lru_cache(maxsize=2)(self._build_epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getstate__(self) -> dict:
        # The epoch cache is rebuilt on demand; data-loader workers get the dataset by path.
        return {k: v for k, v in self.__dict__.items() if k != "_epoch"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._epoch = lru_cache(maxsize=2)(self._build_epoch)

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
    """Several sample streams interleaved by weight, deterministically.

    Megatron's rule (helpers.cpp, build_blending_indices): at global index i the next
    sample comes from the source whose realised count lags its target share the most,
    argmax_s(weight_s * max(i, 1) - count_s), ties to the lower index; that source's own
    next sample (its count so far) is used. Every prefix of the blend is then within one
    sample of the weights. The choice at i depends on all earlier choices, so the table is
    grown sequentially and cached; a restart recomputes it up to the resume point
    (about a million entries a second).
    """

    _GROW = 8192

    def __init__(self, sources: list[tuple[GPTSamples, float]], names: list[str] | None = None):
        if not sources:
            raise ValueError("a blend needs at least one source")
        weights = np.array([float(w) for _, w in sources])
        if np.any(weights <= 0) or not np.all(np.isfinite(weights)):
            raise ValueError(f"blend weights must be positive and finite, got {weights.tolist()}")
        self.sources = [s for s, _ in sources]
        self.weights = weights / weights.sum()
        self.names = names or [s.dataset.prefix for s in self.sources]
        self._source = np.zeros(0, dtype=np.int16)   # source of each global index
        self._position = np.zeros(0, dtype=np.int64)  # index within that source
        self._counts = [0] * len(self.sources)

    def _grow_to(self, size: int) -> None:
        if size <= len(self._source):
            return
        size = max(size, len(self._source) + self._GROW)
        start = len(self._source)
        source = np.empty(size - start, dtype=np.int16)
        position = np.empty(size - start, dtype=np.int64)
        weights, counts = self.weights.tolist(), self._counts
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
        self._source = np.concatenate((self._source, source))
        self._position = np.concatenate((self._position, position))

    def source_of(self, i: int) -> int:
        """Which source (index into `sources`) global sample i comes from."""
        self._grow_to(int(i) + 1)
        return int(self._source[i])

    def locate(self, i: int) -> tuple[int, int]:
        """(source, index within that source) of global sample i."""
        self._grow_to(int(i) + 1)
        return int(self._source[i]), int(self._position[i])

    def __getitem__(self, i: int) -> np.ndarray:
        if i < 0:
            raise IndexError(f"sample index {i} is negative")
        source, position = self.locate(i)
        return self.sources[source][position]

    def batch(self, indices: list[int]) -> np.ndarray:
        """The samples at these global indices stacked: int64 (len(indices), seq_length + 1)."""
        if not indices:
            return np.zeros((0, self.sources[0].seq_length + 1), np.int64)
        return np.stack([self[i] for i in indices])
