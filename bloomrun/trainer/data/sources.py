"""From the manifest's `data` section to the blended training samples, with every file
checked first: the local launcher calls `validate_data` before it starts any worker, so
a missing or corrupt corpus is one clear error instead of N crashed ranks.

Paths are used as given: the launcher resolved them (bloomrun.trainer.resolve)."""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig, DataSource
from .indexed import DataError, MMapIndexedDataset
from .samples import BlendedSamples, GPTSamples


def source_name(source: DataSource) -> str:
    return source.name or Path(source.path).name


def open_sources(data_cfg: DataConfig) -> list[MMapIndexedDataset]:
    """Each source's dataset, opened and checked; DataError names the source and the file."""
    datasets = []
    for i, source in enumerate(data_cfg.sources):
        try:
            datasets.append(MMapIndexedDataset(Path(source.path)))
        except DataError as err:
            raise DataError(f"data.sources[{i}] ({source_name(source)}): {err}") from None
    return datasets


def build_train_samples(data_cfg: DataConfig, seq_length: int) -> BlendedSamples:
    """The blend of every source's samples by weight. Source i shuffles with seed
    data.seed + i, so two sources that are the same file still differ in order."""
    pairs = []
    for i, (source, dataset) in enumerate(zip(data_cfg.sources, open_sources(data_cfg))):
        try:
            pairs.append((GPTSamples(dataset, seq_length, data_cfg.seed + i), source.weight))
        except DataError as err:
            raise DataError(f"data.sources[{i}] ({source_name(source)}): {err}") from None
    return BlendedSamples(pairs, names=[source_name(s) for s in data_cfg.sources])


def validate_data(data_cfg: DataConfig, vocab_size: int, seq_length: int | None = None) -> None:
    """Every source exists, is well-formed, holds token ids below `vocab_size` and (when
    seq_length is given) enough tokens for one sample; the tokenizer, if named, fits too.
    Raises DataError with the source's manifest path in the message."""
    if data_cfg.tokenizer is not None:
        tokenizer_vocab = tokenizer_vocab_size(Path(data_cfg.tokenizer))
        if tokenizer_vocab > vocab_size:
            raise DataError(f"data.tokenizer: {data_cfg.tokenizer} has {tokenizer_vocab} tokens, "
                            f"more than the model's vocabSize {vocab_size}")
    for i, (source, dataset) in enumerate(zip(data_cfg.sources, open_sources(data_cfg))):
        where = f"data.sources[{i}] ({source_name(source)}): {dataset.prefix}.bin"
        tokens = dataset.tokens
        if len(tokens) == 0:
            raise DataError(f"{where}: holds no tokens")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0:
            raise DataError(f"{where}: negative token id {low}")
        if high >= vocab_size:
            raise DataError(f"{where}: token id {high} is not below the model's vocabSize "
                            f"{vocab_size} (prepared with another tokenizer?)")
        if seq_length is not None and (len(tokens) - 1) // seq_length < 1:
            raise DataError(f"{where}: {len(tokens)} tokens is too few for one sample of "
                            f"{seq_length + 1} tokens")


def tokenizer_vocab_size(path: Path) -> int:
    """Vocabulary size of a Hugging Face tokenizers JSON file, added tokens included."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise DataError(f"data.tokenizer: {path}: no such file")
    try:
        return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as err:  # tokenizers raises a bare Exception for any parse failure
        raise DataError(f"data.tokenizer: {path}: not a tokenizers JSON file ({err})") from None
