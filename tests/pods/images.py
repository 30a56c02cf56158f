"""The project's own images for the `pods` tests, from the repository's Dockerfiles.

`tools/images/build.sh NAME` builds the image of the tree as it is (cached by the hash of
its inputs: an unchanged tree costs a hash) and prints its OCI archive's path,
`.../NAME-KEY.tar`, whose image is `bloomrun.local/NAME:KEY`. `make images` builds both
ahead (mk/images.mk; not yet a prerequisite of `make test`), so a test meets a cache hit;
otherwise the first test that needs an image builds it. The archive is imported into every
real node's containerd once per session.
"""

import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "tools" / "images" / "build.sh"
NAMES = ("trainer", "operator")


def archive(name: str) -> Path:
    """The OCI archive of image `name` for the tree as it is now (built if needed)."""
    out = subprocess.run(["bash", str(BUILD), name], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"tools/images/build.sh {name} failed:\n{out.stderr[-4000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def reference(path: Path) -> str:
    """The fully qualified name build.sh gave the image in `path` (NAME-KEY.tar)."""
    name, _, key = path.stem.partition("-")
    return f"bloomrun.local/{name}:{key}"


class Images:
    """Imports each image into the real nodes once; `ref(name)` is what pods name."""

    def __init__(self, nodes):
        self.nodes = nodes
        self.refs: dict[str, str] = {}
        self.seconds: dict[str, float] = {}  # import times, for BENCHMARKS.md

    def ref(self, name: str) -> str:
        if name not in self.refs:
            path = archive(name)
            began = time.monotonic()
            self.nodes.import_image(path)
            self.seconds[name] = time.monotonic() - began
            self.refs[name] = reference(path)
        return self.refs[name]
