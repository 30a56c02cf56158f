"""Raw text to a Megatron .bin/.idx with a Hugging Face `tokenizers` tokenizer: what
`bloomctl data prepare` runs. One document per JSON line (its "text" field) or per
blank-line-separated block of a text file; one sequence per document, as Megatron's
preprocess_data.py writes without --split-sentences."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from .indexed import DataError, IndexedDatasetWriter, best_fitting_dtype

# Tried in order when --eod-token is not given: Megatron's GPT-2 tokenizer, BLOOM's, ours.
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eod>")
_ENCODE_CHUNK = 512  # documents per encode_batch call (tokenizers runs a batch in parallel)


@dataclass(frozen=True)
class PrepareSummary:
    num_documents: int
    num_tokens: int
    num_skipped_empty: int
    dtype: str
    eod_id: int | None


def input_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".txt", ".text"):
        return "text"
    raise DataError(f"{path}: cannot tell the format from '{suffix or 'no suffix'}'; "
                    "name it .jsonl or .txt, or pass --format")


def read_jsonl(path: Path, json_key: str = "text") -> Iterator[str]:
    """The `json_key` field of each non-blank line; DataError names file and line."""
    with open(path, encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_number}: bad JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict) or json_key not in record:
                raise DataError(f"{path}:{line_number}: no '{json_key}' field (set --json-key)")
            text = record[json_key]
            if not isinstance(text, str):
                raise DataError(f"{path}:{line_number}: '{json_key}' is {type(text).__name__}, not a string")
            yield text


def read_text_blocks(path: Path) -> Iterator[str]:
    """Blocks of consecutive non-blank lines, each one document (its newlines kept)."""
    block: list[str] = []
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).rstrip("\n")
                block = []
    if block:
        yield "".join(block).rstrip("\n")


def read_documents(path: Path, fmt: str = "auto", json_key: str = "text") -> Iterator[str]:
    if not path.is_file():
        raise DataError(f"{path}: no such input file")
    if input_format(path, fmt) == "jsonl":
        return read_jsonl(path, json_key)
    return read_text_blocks(path)


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    if not path.is_file():
        raise DataError(f"{path}: tokenizer not found (a Hugging Face tokenizer.json)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on any parse failure
        raise DataError(f"{path}: not a tokenizers JSON file ({err})") from None


def find_eod_id(tokenizer, eod_token: str | None = None) -> int:
    candidates = (eod_token,) if eod_token else EOD_CANDIDATES
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DataError(f"the tokenizer has no end-of-document token ({' or '.join(candidates)}); "
                    "pass --eod-token")


def tokenize_documents(tokenizer, texts: Iterator[str]) -> Iterator[list[int]]:
    """Token ids per document. No special tokens are added around the text, as Megatron's
    preprocessing does not: documents are separated by the EOD appended after each."""
    texts = iter(texts)
    while chunk := list(islice(texts, _ENCODE_CHUNK)):
        for encoding in tokenizer.encode_batch(chunk, add_special_tokens=False):
            yield encoding.ids


def prepare_dataset(input_path: Path, tokenizer_path: Path, output_prefix: Path, *,
                    json_key: str = "text", fmt: str = "auto", append_eod: bool = False,
                    eod_token: str | None = None) -> PrepareSummary:
    """Tokenize `input_path` into OUTPUT_PREFIX.bin/.idx. Documents that tokenize to
    nothing are skipped, as Megatron does. The pair appears only when complete."""
    texts = read_documents(input_path, fmt, json_key)
    tokenizer = load_tokenizer(tokenizer_path)
    eod_id = find_eod_id(tokenizer, eod_token) if append_eod else None
    dtype = best_fitting_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    num_documents = num_tokens = num_skipped = 0
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for ids in tokenize_documents(tokenizer, texts):
            if not ids:
                num_skipped += 1
                continue
            if eod_id is not None:
                ids.append(eod_id)
            writer.add_document(np.asarray(ids, dtype=np.int64))
            num_documents += 1
            num_tokens += len(ids)
    return PrepareSummary(num_documents, num_tokens, num_skipped, str(dtype), eod_id)
