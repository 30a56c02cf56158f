"""The data index cache: arrays computed once per key, published atomically, memory-mapped.

A key is a small dict naming everything an array depends on (for a source's epoch: the
files' identity, the seed, the epoch, the sequence length); its SHA-256 names the file, so
runs with different data, seeds or weights never collide and runs with the same ones share.
A file is written to a unique temporary name, fsynced, then renamed into place, so no
reader ever sees half of one. Builders of one key take an flock on `NAME.lock`, so on one
machine one process builds and the others wait and map its result; where the lock does not
reach (another node on a network volume) two builders write the same bytes and the last
rename wins, which readers cannot tell apart.

Files: `NAME.npy` (np.load(mmap_mode="r"): every rank maps the same pages of the page
cache, so a rank's memory does not grow with the corpus) and `NAME.json` for small records
(the full token scan of a file, validate_data's marker).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .indexed import DataError, data_path, fsync_path, index_path

FORMAT = 1  # bumped when what a key's file holds changes, so old files are never misread
CACHE_ENV = "BLOOMRUN_DATA_CACHE"


def data_cache_dir(checkpoint_dir: str | os.PathLike | None, env=os.environ) -> Path | None:
    """Where a run keeps its data index cache: $BLOOMRUN_DATA_CACHE when the launcher sets
    it (a folder several runs share), else `data-cache` in the run's checkpoint folder (on a
    cluster the checkpoint volume: writable, kept across pod restarts, unlike the data
    volume, which may be read-only). None when a run has neither (then in memory)."""
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV])
    return Path(checkpoint_dir) / "data-cache" if checkpoint_dir else None


def file_identity(prefix: str | os.PathLike) -> dict:
    """What names a dataset's contents for the cache: its real path, and each file's size
    and modification time (ns). Rewriting a file (the writer renames a new one into place)
    changes them; a copy elsewhere is a new identity and gets its own cache entries."""
    identity = {"path": os.path.realpath(os.fspath(prefix))}
    for kind, path in (("idx", index_path(prefix)), ("bin", data_path(prefix))):
        stat = path.stat()
        identity[kind] = [stat.st_size, stat.st_mtime_ns]
    return identity


def key_name(kind: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps({"format": FORMAT, **key}, sort_keys=True).encode()).hexdigest()
    return f"{kind}-{digest[:32]}"


class IndexCache:
    """Arrays and records by key in `folder`; with no folder, arrays are built in memory
    each time and records are not kept."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder is not None else None

    def __repr__(self) -> str:
        return f"IndexCache({self.folder})"

    def array(self, kind: str, key: dict, length: int, build: Callable[[], np.ndarray]) -> np.ndarray:
        """The int64 array of `length` named by (kind, key): mapped read-only from the cache
        when there, else built by `build()` (one process at a time), published and mapped."""
        if self.folder is None:
            return build()
        path = self.folder / f"{key_name(kind, key)}.npy"
        found = _load(path, length)
        if found is not None:
            return found
        with self._lock(path):
            found = _load(path, length)  # another process built it while this one waited
            if found is None:
                array = np.ascontiguousarray(build(), dtype=np.int64)
                assert len(array) == length, (kind, len(array), length)
                self._publish(path, lambda stream: np.save(stream, array, allow_pickle=False))
                found = _load(path, length)
        return found

    def record(self, kind: str, key: dict) -> dict | None:
        if self.folder is None:
            return None
        path = self.folder / f"{key_name(kind, key)}.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("key") == key else None

    def write_record(self, kind: str, key: dict, values: dict) -> None:
        if self.folder is None:
            return
        path = self.folder / f"{key_name(kind, key)}.json"
        text = json.dumps({"key": key, **values}, sort_keys=True)
        self._make_folder()
        self._publish(path, lambda stream: stream.write(text.encode()))

    def _publish(self, path: Path, write: Callable) -> None:
        """Write to a unique temporary file, fsync, rename over `path`, fsync the folder."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as stream:
                write(stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, path)
            fsync_path(path.parent)
        except OSError as err:  # a full or read-only volume: say which folder
            raise DataError(f"data cache {self.folder}: cannot write {path.name} ({err.strerror}); "
                            f"set {CACHE_ENV} to a writable folder with room") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _make_folder(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"data cache {self.folder}: cannot write there ({err.strerror}); "
                            f"set {CACHE_ENV} to a writable folder") from None

    @contextmanager
    def _lock(self, path: Path):
        self._make_folder()
        try:
            fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise DataError(f"data cache {self.folder}: cannot write there ({err.strerror}); "
                            f"set {CACHE_ENV} to a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def _load(path: Path, length: int) -> np.ndarray | None:
    """The published array, mapped; None when absent or not what the key promises (a file
    from a crashed disk, or truncated by hand): then it is built again and replaced."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if array.dtype != np.int64 or array.shape != (length,):
        return None
    return array
