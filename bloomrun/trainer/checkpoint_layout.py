"""Where checkpoints are and which of them are published, without torch: checkpoint.py
verifies and loads them, and `bloomctl run` reads this alone to tell a finished run at once
(importing torch takes seconds). A step folder counts once its metadata.json exists
(torchtitan's rule); whether its files are intact is checkpoint.verify's to say.

history.jsonl beside the step folders: a line (step, tokens, loss) per checkpoint published,
appended as each is published, so the loss curve keeps the checkpoints checkpoint.keepLast
deletes. A study once recorded them by polling the folder each second and lost a point
whenever two checkpoints came within a second on a loaded machine (CI, 2026-12-01)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

METADATA = "metadata.json"
HISTORY = "history.jsonl"
STEP_DIR = re.compile(r"^step-(\d{8,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Published step folders, newest first (complete or not: see checkpoint.verify)."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.match(entry.name)
        # A symlinked step folder is not ours: following it would read (and hash) whatever
        # it points at, another run's checkpoint or any file on the volume.
        if match and entry.is_dir() and not entry.is_symlink():
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)


def read_metadata(path: Path) -> dict | None:
    """A step folder's metadata, None while it has none or it is unreadable (unverified)."""
    try:
        return json.loads((path / METADATA).read_text())
    except (OSError, ValueError):
        return None


def newest_metadata(root: Path) -> dict | None:
    """The metadata of the newest published checkpoint in `root` (checksums not verified)."""
    for _step, path in list_checkpoints(root):
        meta = read_metadata(path)
        if meta is not None:
            return meta
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_folder(root: Path, tmp: Path, final: Path, meta: dict) -> Path:
    """The end of every save: `meta` written last into `tmp` (whose other files are already
    fsynced), the folder fsynced, renamed to `final` (atomic on POSIX) and the parent fsynced.
    Before the rename nothing under a step-N name exists, so a crash never leaves a
    checkpoint that looks complete."""
    with open(tmp / METADATA, "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)
    if final.exists():  # a re-save of the same step (rollback, then SIGTERM at that step)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    append_history(root, meta)
    return final


def append_history(root: Path, meta: dict) -> None:
    """One history line for a published checkpoint. Not fsynced: a line lost to a crash is
    recovered from the step folder by read_history as long as keepLast has not pruned it."""
    point = {"step": meta["step"], "tokens": meta.get("tokens"), "loss": meta.get("loss")}
    with open(root / HISTORY, "a") as f:
        f.write(json.dumps(point) + "\n")


def read_history(root: Path) -> list[dict]:
    """Every checkpoint `root` ever published, by step: {step, tokens, loss}. The history's
    lines, then the step folders' metadata for any missing (a run from before the history,
    a line lost to a crash). A step published twice (a NaN rollback, then a SIGTERM there)
    has its last line; a torn last line (a kill mid-write) is skipped."""
    points: dict[int, dict] = {}
    path = root / HISTORY
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                point = json.loads(line)
                points[int(point["step"])] = point
            except (ValueError, KeyError, TypeError):
                continue
    for step, folder in list_checkpoints(root):
        meta = read_metadata(folder)
        if step not in points and meta is not None:
            points[step] = {"step": step, "tokens": meta.get("tokens"), "loss": meta.get("loss")}
    return [points[step] for step in sorted(points)]
