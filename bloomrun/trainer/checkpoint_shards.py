"""The sharded checkpoint's files, and what each rank holds of each tensor (no collectives).

A sharded checkpoint (`checkpoint.format: sharded`) holds the same tensors as a consolidated
one, by the same names (`<param>`, `<param>.exp_avg`, `<param>.exp_avg_sq`), but each rank
writes only the pieces it holds, to its own `shard-RRRRR.safetensors`:

    shard-00000.safetensors ...   each rank's pieces, keyed `<name>@<offsets>`
    index.json                    for every tensor: dtype, global shape, and its chunks
                                  (offsets, sizes, file, key); written by the coordinator
    rng.safetensors               rank 0's torch RNG
    metadata.json                 as consolidated, plus `layout: sharded`; sha256 and size
                                  of every file above; written last

torch.distributed.checkpoint (DCP) plans the save (replicated pieces written once) and the
load (each rank reads the overlap of its own pieces with the saved chunks, whatever layout
wrote them). Its own FileSystemReader unpickles a `.metadata` file, which this project never
does with anything read from disk, and its HuggingFaceStorageWriter keys a file's tensors
by name, so the two pieces one rank holds of a SwiGLU projection (gate and up) would
overwrite each other. So the storage layer is this module's: safetensors shards, a JSON
index, read back with safetensors' `safe_open` (header JSON and raw bytes, nothing else).

What each rank holds of each tensor (its "pieces", rectangles of the global tensor) comes
from shard_layout.py, not from DTensor's placements (which misdescribe FSDP2's SwiGLU shards).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.distributed.tensor import DTensor
from torch.futures import Future

from bloomrun.trainer.shard_layout import local_pieces

LAYOUT = "sharded"
INDEX = "index.json"
RNG = "rng.safetensors"
SHARD_FILE = re.compile(r"^shard-\d{5}\.safetensors$")
INDEX_VERSION = 1

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}
DTYPE_OF = {name: dtype for dtype, name in DTYPES.items()}


class ShardError(Exception):
    """A sharded checkpoint's index or files that cannot be used; the message says why."""


def shard_file(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"


def checkpointable(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's local tensor with DCP's CheckpointableTensor fields: its pieces' global and
    local offsets. A view of the same storage, so DCP's load writes into the parameter."""
    pieces = local_pieces(tensor)
    local = (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach()
    local.global_shape = tuple(tensor.shape)
    local.global_offsets = tuple(p.global_offset for p in pieces)
    local.local_offsets = tuple(p.local_offset for p in pieces)
    local.local_sizes = tuple(p.size for p in pieces)
    return local


# --------------------------------------------------------------------- safetensors files


@dataclass(frozen=True)
class Entry:
    """One tensor to write: its header fields, and how to get its data when its turn comes."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    data: Callable[[], torch.Tensor]


def write_safetensors(path: Path, entries: list[Entry], metadata: dict[str, str] | None = None) -> dict:
    """A safetensors file written tensor by tensor (the header first, from the entries'
    shapes), so no more than one tensor is in memory; fsynced. Returns {sha256, bytes},
    hashed as written (no second read)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        nbytes = math.prod(e.shape) * torch.empty((), dtype=e.dtype).element_size()
        header[e.key] = {"dtype": DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for block in (len(raw).to_bytes(8, "little"), raw):
            f.write(block)
            digest.update(block)
        for e in entries:
            tensor = e.data().detach()
            if tensor.dtype != e.dtype or tuple(tensor.shape) != e.shape:
                raise ValueError(f"{e.key}: {tensor.dtype} {tuple(tensor.shape)}, header says {e.dtype} {e.shape}")
            flat = tensor.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            f.write(flat)
            digest.update(flat)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def chunk_key(name: str, offsets: Iterable[int]) -> str:
    return f"{name}@{','.join(map(str, offsets))}"


# --------------------------------------------------------------- DCP's storage layer


class ShardWriter(StorageWriter):
    """Each rank writes its planned pieces to `shard-<rank>.safetensors`; the coordinator then
    writes index.json. `files` (on the coordinator, after the save): every file's checksum."""

    def __init__(self, folder: Path, rank: int):
        self.folder, self.rank = folder, rank
        self.files: dict[str, dict] = {}

    def reset(self, checkpoint_id=None) -> None:
        self.files = {}

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        future: Future = Future()
        if not plan.items:  # every piece this rank holds is written by another (replicated)
            future.set_result([])
            return future
        name = shard_file(self.rank)
        entries, results = [], []
        for item in plan.items:
            if item.tensor_data is None:
                raise ShardError(f"{item.index.fqn}: not a tensor; sharded checkpoints hold tensors only")
            chunk = item.tensor_data.chunk
            key = chunk_key(item.index.fqn, chunk.offsets)
            entries.append(Entry(key, item.tensor_data.properties.dtype, tuple(chunk.sizes),
                                 lambda item=item: planner.resolve_data(item)))
            results.append(WriteResult(index=item.index, size_in_bytes=0, storage_data={"file": name, "key": key}))
        checksum = write_safetensors(self.folder / name, entries)
        for result in results:
            result.storage_data["checksum"] = checksum
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        where = {}
        for result in (r for rank_results in results for r in rank_results):
            where[(result.index.fqn, tuple(result.index.offset))] = result.storage_data
            self.files[result.storage_data["file"]] = result.storage_data["checksum"]
        self.files[INDEX] = write_index(self.folder / INDEX, metadata, where)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True

    def storage_meta(self):
        return None


def write_index(path: Path, metadata: Metadata, where: dict) -> dict:
    """index.json from DCP's global metadata and where each chunk went."""
    tensors = {}
    for name, md in sorted(metadata.state_dict_metadata.items()):
        if not isinstance(md, TensorStorageMetadata):
            raise ShardError(f"{name}: not a tensor; sharded checkpoints hold tensors only")
        chunks = []
        for chunk in md.chunks:
            stored = where[(name, tuple(chunk.offsets))]
            chunks.append({"offsets": list(chunk.offsets), "sizes": list(chunk.sizes),
                           "file": stored["file"], "key": stored["key"]})
        tensors[name] = {"dtype": DTYPES[md.properties.dtype], "shape": list(md.size), "chunks": chunks}
    raw = json.dumps({"version": INDEX_VERSION, "tensors": tensors}, indent=1).encode()
    with open(path, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}


def read_index(folder: Path, listed_files: Iterable[str]) -> dict:
    """index.json, checked: every chunk inside its tensor, in a shard file the metadata lists
    (so checksummed), and the chunks of each tensor adding up to it."""
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, ValueError) as err:
        raise ShardError(f"{folder / INDEX}: unreadable ({err})") from None
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION or not isinstance(index.get("tensors"), dict):
        raise ShardError(f"{folder / INDEX}: not a version {INDEX_VERSION} index")
    files = set(listed_files)
    for name, entry in index["tensors"].items():
        try:
            shape, chunks, dtype = entry["shape"], entry["chunks"], entry["dtype"]
            volume = 0
            for chunk in chunks:
                offsets, sizes = chunk["offsets"], chunk["sizes"]
                if (len(offsets) != len(shape) or len(sizes) != len(shape)
                        or any(o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape))):
                    raise ShardError(f"chunk {offsets}+{sizes} outside shape {shape}")
                if chunk["file"] not in files or not SHARD_FILE.match(chunk["file"]):
                    raise ShardError(f"chunk in {chunk['file']!r}, which metadata.json does not list")
                volume += math.prod(sizes)
            if dtype not in DTYPE_OF or volume != math.prod(shape):
                raise ShardError(f"dtype {dtype!r}, chunks covering {volume} of {math.prod(shape)} elements")
        except (KeyError, TypeError) as err:
            raise ShardError(f"{folder / INDEX}: {name}: malformed ({err})") from None
        except ShardError as err:
            raise ShardError(f"{folder / INDEX}: {name}: {err}") from None
    return index


def dcp_metadata(index: dict) -> Metadata:
    """DCP's Metadata from index.json (what its FileSystemReader would unpickle)."""
    tensors, storage = {}, {}
    for name, entry in index["tensors"].items():
        chunks = [ChunkStorageMetadata(torch.Size(c["offsets"]), torch.Size(c["sizes"])) for c in entry["chunks"]]
        tensors[name] = TensorStorageMetadata(TensorProperties(dtype=DTYPE_OF[entry["dtype"]]),
                                              torch.Size(entry["shape"]), chunks)
        for c in entry["chunks"]:
            storage[MetadataIndex(name, torch.Size(c["offsets"]))] = (c["file"], c["key"])
    return Metadata(state_dict_metadata=tensors, storage_data=storage)


class ShardReader(StorageReader):
    """DCP's reads from the shard files, by the (already verified) index."""

    def __init__(self, folder: Path, index: dict):
        self.folder, self.index = folder, index
        self.storage: dict = {}

    def reset(self, checkpoint_id=None) -> None:
        pass

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return dcp_metadata(self.index)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        self.storage = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        from safetensors import safe_open

        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.storage[item.storage_index][0], []).append(item)
        for file, items in sorted(by_file.items()):
            with safe_open(str(self.folder / file), framework="pt") as f:
                for item in items:
                    key = self.storage[item.storage_index][1]
                    window = tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))
                    target = planner.resolve_tensor(item).detach()
                    target.copy_(f.get_slice(key)[window])
                    planner.commit_tensor(item, target)
        future: Future = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True


# ------------------------------------------------------------------- full tensors


def full_tensor(folder: Path, index: dict, name: str) -> torch.Tensor:
    """One tensor assembled from its chunks (only its own bytes are read)."""
    from safetensors import safe_open

    entry = index["tensors"][name]
    out = torch.empty(entry["shape"], dtype=DTYPE_OF[entry["dtype"]])
    for chunk in entry["chunks"]:
        window = tuple(slice(o, o + n) for o, n in zip(chunk["offsets"], chunk["sizes"]))
        with safe_open(str(folder / chunk["file"]), framework="pt") as f:
            out[window] = f.get_tensor(chunk["key"])
    return out


class FullTensors(Mapping):
    """The checkpoint's full tensors by name (a selection of them), each assembled when asked
    for: a consolidated view of a sharded checkpoint that holds one tensor at a time."""

    def __init__(self, folder: Path, index: dict, names: Iterable[str]):
        self.folder, self.index, self.names = folder, index, list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return full_tensor(self.folder, self.index, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def entries(self) -> list[Entry]:
        """For write_safetensors: each tensor read from the shards when its turn comes."""
        tensors = self.index["tensors"]
        return [Entry(n, DTYPE_OF[tensors[n]["dtype"]], tuple(tensors[n]["shape"]), lambda n=n: self[n])
                for n in self.names]
