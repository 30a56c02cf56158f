"""The .bin/.idx format: byte compatibility with Megatron-DeepSpeed and every corruption error."""

import os
import pickle
import struct

import numpy as np
import pytest

from bloomrun.trainer.data import DataError, IndexedDatasetWriter, MMapIndexedDataset

from .data_helpers import write_dataset


def megatron_index_bytes(sizes, dtype_code, itemsize, doc_idx=None):
    """An .idx built by hand from the documented layout, independently of our writer."""
    doc_idx = list(range(len(sizes) + 1)) if doc_idx is None else doc_idx
    pointers, address = [], 0
    for size in sizes:
        pointers.append(address)
        address += size * itemsize
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code)
    out += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
    out += b"".join(struct.pack("<i", s) for s in sizes)
    out += b"".join(struct.pack("<q", p) for p in pointers)
    out += b"".join(struct.pack("<q", d) for d in doc_idx)
    return out


DOCS = [[5, 6, 7], [], [1000, 2, 65000], [9]]


def test_reads_hand_built_megatron_files(tmp_path):
    sizes = [len(d) for d in DOCS]
    (tmp_path / "hand.idx").write_bytes(megatron_index_bytes(sizes, 8, 2))
    (tmp_path / "hand.bin").write_bytes(b"".join(struct.pack("<H", t) for d in DOCS for t in d))
    ds = MMapIndexedDataset(tmp_path / "hand")
    assert ds.dtype == np.uint16
    assert len(ds) == 4 and ds.num_documents == 4 and ds.num_tokens == 7
    assert [ds[i].tolist() for i in range(4)] == DOCS
    assert ds.doc_idx.tolist() == [0, 1, 2, 3, 4]


def test_reads_multi_sentence_documents(tmp_path):
    # Megatron with --split-sentences: several sequences per document.
    sentences = [[1, 2], [3], [4, 5, 6], [7]]
    sizes = [len(s) for s in sentences]
    (tmp_path / "s.idx").write_bytes(megatron_index_bytes(sizes, 4, 4, doc_idx=[0, 2, 4]))
    (tmp_path / "s.bin").write_bytes(np.array(sum(sentences, []), "<i4").tobytes())
    ds = MMapIndexedDataset(tmp_path / "s")
    assert ds.num_documents == 2 and ds[2].tolist() == [4, 5, 6]


@pytest.mark.parametrize("dtype,code", [(np.uint8, 1), (np.int8, 2), (np.int16, 3),
                                        (np.int32, 4), (np.int64, 5), (np.uint16, 8)])
def test_writer_output_is_byte_identical_to_the_layout(tmp_path, dtype, code):
    docs = [[1, 2, 3], [], [4, 5, 6, 7, 8], [9]]
    write_dataset(tmp_path / "w", docs, dtype)
    itemsize = np.dtype(dtype).itemsize
    assert (tmp_path / "w.idx").read_bytes() == megatron_index_bytes([3, 0, 5, 1], code, itemsize)
    assert (tmp_path / "w.bin").read_bytes() == np.array(sum(docs, []), np.dtype(dtype).newbyteorder("<")).tobytes()
    ds = MMapIndexedDataset(tmp_path / "w")
    assert [ds[i].tolist() for i in range(len(ds))] == docs


def test_empty_dataset_round_trips(tmp_path):
    write_dataset(tmp_path / "e", [])
    ds = MMapIndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0


def test_pickles_by_path(tmp_path):
    write_dataset(tmp_path / "p", DOCS)
    ds = pickle.loads(pickle.dumps(MMapIndexedDataset(tmp_path / "p")))
    assert ds[2].tolist() == DOCS[2]
    assert len(pickle.dumps(ds)) < 200  # the path, not the tokens


def test_writer_rejects_ids_that_do_not_fit(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    with pytest.raises(ValueError, match="70000 does not fit uint16"):
        writer.add_document([1, 70000])
    writer.abort()


def test_crash_while_writing_leaves_no_dataset(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "c", np.uint16) as writer:
            writer.add_document([1, 2])
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_crash_while_rewriting_keeps_the_previous_dataset(tmp_path):
    write_dataset(tmp_path / "d", DOCS)
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16) as writer:
            writer.add_document([42] * 100)
            raise RuntimeError("killed")
    ds = MMapIndexedDataset(tmp_path / "d")
    assert [ds[i].tolist() for i in range(4)] == DOCS


def test_unfinalized_writer_never_publishes(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "u", np.uint16)
    writer.add_document([1, 2, 3])  # the process dies here: only the .tmp exists
    with pytest.raises(DataError, match=r"u: no dataset here"):
        MMapIndexedDataset(tmp_path / "u")
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_crash_between_the_renames_is_an_error_not_old_data(tmp_path, monkeypatch):
    write_dataset(tmp_path / "r", [[1, 2], [3]])
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt  # the process dies after the .bin was published
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    writer = IndexedDatasetWriter(tmp_path / "r", np.uint16)
    writer.add_document([7, 8, 9])  # same byte length as the old .bin
    with pytest.raises(KeyboardInterrupt):
        writer.finalize()
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"r\.idx: no such file"):
        MMapIndexedDataset(tmp_path / "r")


# ------------------------------------------------------------------- corruption


@pytest.fixture
def good(tmp_path):
    return write_dataset(tmp_path / "good", DOCS)


def corrupt_idx(prefix, edit):
    path = prefix.with_suffix(".idx")
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(edit(data)))


def test_missing_bin_names_the_file(good):
    good.with_suffix(".bin").unlink()
    with pytest.raises(DataError, match=r"good\.bin: no such file"):
        MMapIndexedDataset(good)


def test_missing_idx_names_the_file(good):
    good.with_suffix(".idx").unlink()
    with pytest.raises(DataError, match=r"good\.idx: no such file"):
        MMapIndexedDataset(good)


def test_bad_magic(good):
    corrupt_idx(good, lambda d: b"TNTIDX\x00\x00" + d[8:])  # the older, non-mmap format
    with pytest.raises(DataError, match=r"good\.idx: bad magic"):
        MMapIndexedDataset(good)


def test_unknown_version(good):
    corrupt_idx(good, lambda d: d[:9] + struct.pack("<Q", 2) + d[17:])
    with pytest.raises(DataError, match="unsupported index version 2"):
        MMapIndexedDataset(good)


@pytest.mark.parametrize("code,message", [(9, "unknown dtype code 9"), (0, "unknown dtype code 0"),
                                          (6, "dtype code 6 is float64"), (7, "dtype code 7 is float")])
def test_unknown_or_float_dtype(good, code, message):
    corrupt_idx(good, lambda d: d[:17] + bytes([code]) + d[18:])
    with pytest.raises(DataError, match=message):
        MMapIndexedDataset(good)


def test_truncated_header(good):
    corrupt_idx(good, lambda d: d[:20])
    with pytest.raises(DataError, match="truncated header"):
        MMapIndexedDataset(good)


def test_truncated_index(good):
    corrupt_idx(good, lambda d: d[:-8])
    with pytest.raises(DataError, match=r"good\.idx: .*truncated"):
        MMapIndexedDataset(good)


def test_truncated_bin(good):
    path = good.with_suffix(".bin")
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"good\.bin: 12 bytes, but good\.idx describes 14"):
        MMapIndexedDataset(good)


def test_bin_longer_than_index_says(good):
    path = good.with_suffix(".bin")
    path.write_bytes(path.read_bytes() + b"\x00\x00")
    with pytest.raises(DataError, match="16 bytes, but good.idx describes 14"):
        MMapIndexedDataset(good)


def test_sizes_that_disagree_with_pointers(good):
    # sequence 0 claims 4 tokens, so sequence 1 should start at byte 8, not 6.
    corrupt_idx(good, lambda d: d[:34] + struct.pack("<i", 4) + d[38:])
    with pytest.raises(DataError, match="pointer of sequence 1 is 6, expected 8"):
        MMapIndexedDataset(good)


def test_negative_size(good):
    corrupt_idx(good, lambda d: d[:34] + struct.pack("<i", -3) + d[38:])
    with pytest.raises(DataError, match="negative sequence size at sequence 0"):
        MMapIndexedDataset(good)


def test_bad_doc_idx(good):
    corrupt_idx(good, lambda d: d[:-8] + struct.pack("<q", 3))
    with pytest.raises(DataError, match="doc_idx must rise from 0 to the number of sequences"):
        MMapIndexedDataset(good)
