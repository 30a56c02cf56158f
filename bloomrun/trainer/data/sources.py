"""From the manifest's `data` section to the blended training samples, with every file
checked first: the local launcher calls `validate_data` before it starts any worker, so
a missing or corrupt corpus is one clear error instead of N crashed ranks.

What a start costs does not grow with the corpus: every call checks each file's header,
lengths and end entries and a bounded sample of its tokens; reading every index entry and
every token (the scan) happens once per file identity and is recorded in the data cache
(cache.py), so a changed file is scanned again. Without a cache folder there is nowhere to
record it, and the scan runs on every call.

Paths are used as given: the launcher resolved them (bloomrun.trainer.resolve)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import DataConfig, DataSource
from .cache import IndexCache, file_identity
from .indexed import DataError, MMapIndexedDataset
from .samples import BlendedSamples, GPTSamples

SAMPLED_TOKENS = 1 << 20  # tokens of each file checked on every start, in 64 spread-out blocks


def source_name(source: DataSource) -> str:
    return source.name or Path(source.path).name


def open_sources(data_cfg: DataConfig) -> list[MMapIndexedDataset]:
    """Each source's dataset, opened with the checks that cost the same for any corpus
    (token_scan checks every entry, once); DataError names the source and the file."""
    datasets = []
    for i, source in enumerate(data_cfg.sources):
        try:
            datasets.append(MMapIndexedDataset(Path(source.path), check_arrays=False))
        except DataError as err:
            raise DataError(f"data.sources[{i}] ({source_name(source)}): {err}") from None
    return datasets


def build_train_samples(data_cfg: DataConfig, seq_length: int, cache_dir: Path | None = None) -> BlendedSamples:
    """The blend of every source's samples by weight. Source i shuffles with seed
    data.seed + i, so two sources that are the same file still differ in order. The index
    arrays live in `cache_dir` (cache.data_cache_dir), else in memory."""
    cache = IndexCache(cache_dir)
    pairs = []
    for i, (source, dataset) in enumerate(zip(data_cfg.sources, open_sources(data_cfg))):
        try:
            pairs.append((GPTSamples(dataset, seq_length, data_cfg.seed + i, cache), source.weight))
        except DataError as err:
            raise DataError(f"data.sources[{i}] ({source_name(source)}): {err}") from None
    return BlendedSamples(pairs, names=[source_name(s) for s in data_cfg.sources], cache=cache)


def validate_data(data_cfg: DataConfig, vocab_size: int, seq_length: int | None = None,
                  cache_dir: Path | None = None) -> None:
    """Every source exists, is well-formed, holds token ids below `vocab_size` and (when
    seq_length is given) enough tokens for one sample; the tokenizer, if named, fits too.
    The full scan of a file runs once per file identity when `cache_dir` records it (see
    the module's docstring). Raises DataError with the source's manifest path in the message."""
    if data_cfg.tokenizer is not None:
        tokenizer_vocab = tokenizer_vocab_size(Path(data_cfg.tokenizer))
        if tokenizer_vocab > vocab_size:
            raise DataError(f"data.tokenizer: {data_cfg.tokenizer} has {tokenizer_vocab} tokens, "
                            f"more than the model's vocabSize {vocab_size}")
    cache = IndexCache(cache_dir)
    pending: list[tuple[dict, dict]] = []  # new scans, recorded once every source passed
    for i, (source, dataset) in enumerate(zip(data_cfg.sources, open_sources(data_cfg))):
        where = f"data.sources[{i}] ({source_name(source)}): {dataset.prefix}.bin"
        tokens = dataset.tokens
        if len(tokens) == 0:
            raise DataError(f"{where}: holds no tokens")
        try:
            scan = token_scan(dataset, cache, pending)
        except DataError as err:
            raise DataError(f"data.sources[{i}] ({source_name(source)}): {err}") from None
        sample = sampled_tokens(tokens)
        low, high = min(scan["min_token"], int(sample.min())), max(scan["max_token"], int(sample.max()))
        if low < 0:
            raise DataError(f"{where}: negative token id {low}")
        if high >= vocab_size:
            raise DataError(f"{where}: token id {high} is not below the model's vocabSize "
                            f"{vocab_size} (prepared with another tokenizer?)")
        if seq_length is not None and (len(tokens) - 1) // seq_length < 1:
            raise DataError(f"{where}: {len(tokens)} tokens is too few for one sample of "
                            f"{seq_length + 1} tokens")
    for key, scan in pending:  # only now: a run refused for its data leaves no folder behind
        cache.write_record("scan", key, scan)


def token_scan(dataset: MMapIndexedDataset, cache: IndexCache, pending: list) -> dict:
    """Every index entry checked and the smallest and largest token id: from the cache's
    record for this file identity, else read in full (and appended to `pending`, which
    the caller records)."""
    key = {"dataset": file_identity(dataset.prefix)}
    scan = cache.record("scan", key)
    if scan is None:
        MMapIndexedDataset(dataset.prefix, check_arrays=True)  # raises on any bad entry
        tokens = dataset.tokens
        scan = {"num_tokens": len(tokens), "min_token": int(tokens.min()), "max_token": int(tokens.max())}
        pending.append((key, scan))
    return scan


def sampled_tokens(tokens: np.ndarray) -> np.ndarray:
    """At most SAMPLED_TOKENS tokens: all of a small file, else 64 blocks spread evenly over it."""
    budget = SAMPLED_TOKENS
    if len(tokens) <= budget:
        return np.asarray(tokens)
    block = budget // 64
    starts = np.linspace(0, len(tokens) - block, 64).astype(np.int64)
    return np.concatenate([tokens[s:s + block] for s in starts])


def tokenizer_vocab_size(path: Path) -> int:
    """Vocabulary size of a Hugging Face tokenizers JSON file, added tokens included."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise DataError(f"data.tokenizer: {path}: no such file")
    try:
        return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as err:  # tokenizers raises a bare Exception for any parse failure
        raise DataError(f"data.tokenizer: {path}: not a tokenizers JSON file ({err})") from None
