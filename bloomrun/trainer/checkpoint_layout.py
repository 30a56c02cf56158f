"""Where checkpoints are and which of them are published, without torch: checkpoint.py
verifies and loads them, and `bloomctl run` reads this alone to tell a finished run at once
(importing torch takes seconds). A step folder counts once its metadata.json exists
(torchtitan's rule); whether its files are intact is checkpoint.verify's to say."""

from __future__ import annotations

import json
import re
from pathlib import Path

METADATA = "metadata.json"
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
