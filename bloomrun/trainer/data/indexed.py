"""Megatron-DeepSpeed's MMapIndexedDataset (`PREFIX.bin` + `PREFIX.idx`), read and written
byte for byte as BigScience's pipeline does, so corpora prepared for BLOOM load as they are.

`PREFIX.idx`, all integers little-endian:

    offset  size       field
    0       9          magic b"MMIDIDX\\x00\\x00"
    9       8 (u64)    version, always 1
    17      1 (u8)     dtype code of the tokens in .bin (DTYPE_CODES)
    18      8 (u64)    num_sequences
    26      8 (u64)    num_doc_idx = number of documents + 1
    34      4 * S      sizes: tokens per sequence (int32)
    ...     8 * S      pointers: byte offset of each sequence in .bin (int64)
    ...     8 * D      doc_idx: first sequence of each document, then S (int64)

`PREFIX.bin` is the sequences' tokens back to back, nothing else. Megatron calls each
entry a "sequence" (a sentence when preprocessing split sentences, else a whole document);
`doc_idx` groups them into documents. GPT training only uses the sequences.

References: megatron/data/indexed_dataset.py in bigscience-workshop/Megatron-DeepSpeed
(`MMapIndexedDataset.Index` and `MMapIndexedDatasetBuilder`).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, num_sequences, num_doc_idx

# Megatron-DeepSpeed's code table. Its codes 6 and 7 are `np.float` and `np.double`, which
# are both float64 in the numpy it ran on (Megatron-LM core later redefined 7 as float32);
# floats are not token ids, so this reader refuses both rather than guess.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}
_FLOAT_CODES = {6: "float64 (np.float)", 7: "float64 (np.double) / float32 (Megatron-LM core)"}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and the problem."""


def index_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def data_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def best_fitting_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 while every id fits (it keeps a margin below 65,536), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def dtype_code(dtype: np.dtype | type) -> int:
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF:
        raise ValueError(f"token dtype {dtype} has no Megatron code; use one of "
                         f"{sorted(str(d) for d in _CODE_OF)}")
    return _CODE_OF[dtype]


class MMapIndexedDataset:
    """A memory-mapped `PREFIX.bin`/`PREFIX.idx` pair, checked for consistency on open.

    `ds[i]` is sequence i as a read-only view of the mapped tokens; `ds.sizes`,
    `ds.pointers` and `ds.doc_idx` are the index arrays. Pickles by path, so data-loader
    workers re-map the files instead of copying them.

    `check_arrays=False` checks only what costs the same for any corpus (the header, both
    files' lengths, the first and last entries); the training pipeline opens files that
    way once validate_data has checked every entry (sources.py records that it did).
    """

    def __init__(self, prefix: str | os.PathLike, check_arrays: bool = True):
        self.prefix = os.fspath(prefix)
        self._open(check_arrays)

    def _open(self, check_arrays: bool) -> None:
        idx_file, bin_file = index_path(self.prefix), data_path(self.prefix)
        missing = [path for path in (bin_file, idx_file) if not path.is_file()]
        if len(missing) == 2:
            raise DataError(f"{self.prefix}: no dataset here (neither {bin_file.name} nor {idx_file.name} exists)")
        if missing:
            raise DataError(f"{missing[0]}: no such file (a dataset is PREFIX.bin plus PREFIX.idx)")
        header = read_index_header(idx_file)
        self.dtype: np.dtype = header["dtype"]
        num_sequences, num_doc_idx = header["num_sequences"], header["num_doc_idx"]

        expected_idx = _HEADER.size + 4 * num_sequences + 8 * num_sequences + 8 * num_doc_idx
        idx_size = idx_file.stat().st_size
        if idx_size != expected_idx:
            raise DataError(
                f"{idx_file}: {idx_size} bytes, but its header ({num_sequences} sequences, "
                f"{num_doc_idx} doc_idx entries) needs {expected_idx}: truncated or not an index"
            )
        index = np.memmap(idx_file, mode="r", dtype=np.uint8)
        offset = _HEADER.size
        self.sizes = np.frombuffer(index, np.int32, num_sequences, offset)
        offset += self.sizes.nbytes
        self.pointers = np.frombuffer(index, np.int64, num_sequences, offset)
        offset += self.pointers.nbytes
        self.doc_idx = np.frombuffer(index, np.int64, num_doc_idx, offset)

        bin_size = bin_file.stat().st_size
        check = _check_index_arrays if check_arrays else _check_index_ends
        check(idx_file, bin_file, bin_size, self.sizes, self.pointers, self.doc_idx, self.dtype.itemsize)
        # np.memmap refuses empty files; an empty corpus is still a valid (useless) dataset.
        if bin_size:
            self._tokens = np.memmap(bin_file, mode="r", dtype=self.dtype)
        else:
            self._tokens = np.zeros(0, self.dtype)

    def __getstate__(self) -> str:
        return self.prefix

    def __setstate__(self, prefix: str) -> None:
        self.prefix = prefix
        self._open(check_arrays=False)  # checked when first opened

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self._tokens[start:start + int(self.sizes[i])]

    @property
    def tokens(self) -> np.ndarray:
        """Every token of the .bin, in file order (the sequences are contiguous)."""
        return self._tokens

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        """Tokens in the .bin (the index's sizes add up to it: checked on open)."""
        return len(self._tokens)


def read_index_header(idx_file: Path) -> dict:
    """The fixed-size header of an .idx, validated; raises DataError naming the file."""
    with open(idx_file, "rb") as stream:
        raw = stream.read(_HEADER.size)
    if raw[:len(MAGIC)] != MAGIC:
        raise DataError(f"{idx_file}: bad magic {raw[:len(MAGIC)]!r}, expected {MAGIC!r} "
                        "(not a Megatron MMapIndexedDataset index)")
    if len(raw) < _HEADER.size:
        raise DataError(f"{idx_file}: truncated header ({len(raw)} of {_HEADER.size} bytes)")
    _, version, code, num_sequences, num_doc_idx = _HEADER.unpack(raw)
    if version != VERSION:
        raise DataError(f"{idx_file}: unsupported index version {version} (only {VERSION})")
    if code in _FLOAT_CODES:
        raise DataError(f"{idx_file}: dtype code {code} is {_FLOAT_CODES[code]}, not token ids")
    if code not in DTYPE_CODES:
        raise DataError(f"{idx_file}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    if num_doc_idx < 1:
        raise DataError(f"{idx_file}: doc_idx is empty; it must start with 0")
    return {"dtype": DTYPE_CODES[code], "num_sequences": num_sequences, "num_doc_idx": num_doc_idx}


def _check_index_arrays(idx_file: Path, bin_file: Path, bin_size: int, sizes: np.ndarray,
                        pointers: np.ndarray, doc_idx: np.ndarray, itemsize: int) -> None:
    """The sequences must tile the .bin exactly, in order, and doc_idx must group them."""
    if len(sizes) and int(sizes.min()) < 0:
        raise DataError(f"{idx_file}: negative sequence size at sequence {int(np.argmin(sizes))}")
    byte_sizes = sizes.astype(np.int64) * itemsize
    expected_pointers = np.concatenate(([0], np.cumsum(byte_sizes)[:-1])) if len(sizes) else byte_sizes
    if not np.array_equal(pointers, expected_pointers):
        bad = int(np.flatnonzero(pointers != expected_pointers)[0])
        raise DataError(f"{idx_file}: pointer of sequence {bad} is {int(pointers[bad])}, "
                        f"expected {int(expected_pointers[bad])} from the sizes before it")
    total = int(byte_sizes.sum())
    if total != bin_size:
        raise DataError(
            f"{bin_file}: {bin_size} bytes, but {idx_file.name} describes {total} "
            f"({total // itemsize} tokens of {itemsize} bytes): truncated or from another index"
        )
    if doc_idx[0] != 0 or doc_idx[-1] != len(sizes) or np.any(np.diff(doc_idx) < 0):
        raise DataError(f"{idx_file}: doc_idx must rise from 0 to the number of sequences "
                        f"({len(sizes)}); got {doc_idx[0]} .. {doc_idx[-1]}")


def _check_index_ends(idx_file: Path, bin_file: Path, bin_size: int, sizes: np.ndarray,
                      pointers: np.ndarray, doc_idx: np.ndarray, itemsize: int) -> None:
    """_check_index_arrays' checks that cost the same for any corpus: the first and last
    sequence, the .bin's length, doc_idx's ends."""
    last = len(sizes) - 1
    end = int(pointers[last]) + int(sizes[last]) * itemsize if len(sizes) else 0
    if len(sizes) and (int(pointers[0]) != 0 or int(sizes[0]) < 0 or int(sizes[last]) < 0):
        raise DataError(f"{idx_file}: the first or last sequence's size or pointer is impossible")
    if end != bin_size:
        raise DataError(f"{bin_file}: {bin_size} bytes, but {idx_file.name} describes {end} "
                        f"({end // itemsize} tokens of {itemsize} bytes): truncated or from another index")
    if doc_idx[0] != 0 or doc_idx[-1] != len(sizes):
        raise DataError(f"{idx_file}: doc_idx must rise from 0 to the number of sequences "
                        f"({len(sizes)}); got {doc_idx[0]} .. {doc_idx[-1]}")


class IndexedDatasetWriter:
    """Writes a dataset one document (one sequence) at a time.

    Tokens go to `PREFIX.bin.tmp` and the index to `PREFIX.idx.tmp`; `finalize()` fsyncs
    both, deletes any old .idx, then renames .bin and finally .idx into place. A crash at
    any point leaves the previous complete pair or no .idx at all (a clear error on open),
    never an index describing other tokens.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self._sizes: list[int] = []
        self._bin_tmp = Path(f"{data_path(self.prefix)}.tmp")
        self._bin_tmp.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._bin_tmp, "wb")

    def add_document(self, tokens) -> None:
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"a document is a 1-D sequence of token ids, got shape {array.shape}")
        if array.size:
            info = np.iinfo(self.dtype)
            low, high = int(array.min()), int(array.max())
            if low < info.min or high > info.max:
                raise ValueError(f"token id {high if high > info.max else low} does not fit {self.dtype}")
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.append(int(array.size))

    @property
    def num_documents(self) -> int:
        return len(self._sizes)

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        idx_tmp = Path(f"{index_path(self.prefix)}.tmp")
        with open(idx_tmp, "wb") as stream:
            stream.write(encode_index(self._sizes, self.dtype))
            stream.flush()
            os.fsync(stream.fileno())
        # Remove the old index first: between the two renames the prefix then has no .idx
        # (an error on open) rather than an old index over a new .bin of the same length.
        index_path(self.prefix).unlink(missing_ok=True)
        os.replace(self._bin_tmp, data_path(self.prefix))
        os.replace(idx_tmp, index_path(self.prefix))
        fsync_path(Path(self.prefix).parent)  # the renames survive a crash

    def abort(self) -> None:
        """Drop what was written (the previous dataset at this prefix, if any, stays)."""
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def encode_index(sizes: list[int] | np.ndarray, dtype: np.dtype, doc_idx=None) -> bytes:
    """The .idx bytes for sequences of these sizes; one document per sequence by default."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) and int(sizes.max()) > np.iinfo(np.int32).max:
        raise ValueError("a sequence longer than 2**31 - 1 tokens does not fit the int32 sizes")
    doc_idx = np.arange(len(sizes) + 1) if doc_idx is None else np.asarray(doc_idx)
    byte_sizes = sizes * np.dtype(dtype).itemsize
    pointers = np.concatenate(([0], np.cumsum(byte_sizes)[:-1])) if len(sizes) else byte_sizes
    header = _HEADER.pack(MAGIC, VERSION, dtype_code(dtype), len(sizes), len(doc_idx))
    return b"".join((
        header,
        sizes.astype("<i4").tobytes(),
        pointers.astype("<i8").tobytes(),
        doc_idx.astype("<i8").tobytes(),
    ))


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder: that makes the renames and creations in it durable.
    (Also checkpoint.py's, which publishes by rename too.)"""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
