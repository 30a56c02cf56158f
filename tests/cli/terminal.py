"""A real terminal for the display tests: tmux, run detached at a given size, read back with
`tmux capture-pane -p` (what a person sees, after the terminal's own wrapping).

tmux comes from the machine when it has one; otherwise Debian's binary and the two libraries
it needs are unpacked from their .debs into the repo's cache, as tools/k8s/build.sh does for
promtool (no root needed; the Makefile assumes nothing on the machine but python3, go and a
C compiler).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("tmux", "libevent-core-2.1-7", "libutempter0")


def unpack_tmux(cache: Path) -> Path:
    """<cache>/tmux/ holding usr/bin/tmux and its libraries, unpacked once."""
    folder = cache / "tmux"
    if (folder / "usr" / "bin" / "tmux").exists():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache))
    download = ["apt-get", "download", *PACKAGES]
    if subprocess.run(download, cwd=work, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True)  # lists too old to know them
        subprocess.run(download, cwd=work, check=True, capture_output=True)
    for deb in work.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
    if not (work / "root" / "usr" / "bin" / "tmux").exists():
        raise FileNotFoundError(f"no usr/bin/tmux in {sorted(p.name for p in work.glob('*.deb'))}")
    if not folder.exists():  # else another test run unpacked it meanwhile
        os.replace(work / "root", folder)
    shutil.rmtree(work, ignore_errors=True)
    return folder


def find_tmux(cache: Path) -> tuple[str, dict[str, str]]:
    """(tmux's path, variables it needs to run)."""
    found = shutil.which("tmux")
    if found:
        return found, {}
    folder = unpack_tmux(cache)
    libraries = sorted({str(lib.parent) for lib in folder.rglob("*.so*")})
    return str(folder / "usr" / "bin" / "tmux"), {"LD_LIBRARY_PATH": os.pathsep.join(libraries)}


class Tmux:
    """One detached tmux server and session of a fixed size, on its own socket."""

    def __init__(self, binary: str, env: dict[str, str], socket: Path):
        self.binary, self.socket = binary, socket
        self.env = dict(os.environ) | env

    def tmux(self, *args: str) -> str:
        result = subprocess.run([self.binary, "-S", str(self.socket), *args], env=self.env,
                                capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def start(self, command: list[str], columns: int, rows: int, cwd: Path, env: dict[str, str]) -> None:
        """Run `command` in a new session; the shell stays after it ends, printing its status."""
        exports = " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
        line = f"cd {shlex.quote(str(cwd))} && env {exports} {shlex.join(command)}; echo EXIT=$?; sleep 600"
        self.tmux("new-session", "-d", "-s", "run", "-x", str(columns), "-y", str(rows), line)
        self.tmux("set-option", "-t", "run", "history-limit", "5000")

    def screen(self) -> list[str]:
        """The visible screen, line by line, trailing blanks dropped."""
        return self.tmux("capture-pane", "-p", "-t", "run").rstrip("\n").split("\n")

    def scrollback(self, joined: bool = False) -> list[str]:
        """Everything the pane showed, including what scrolled off; `joined` puts lines the
        terminal wrapped back together (so the two differ exactly when something wrapped)."""
        args = ("capture-pane", "-p", *(("-J",) if joined else ()), "-S", "-", "-t", "run")
        return self.tmux(*args).rstrip("\n").split("\n")

    def wait_for(self, text: str, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if any(text in line for line in screen):
                return screen
            time.sleep(0.5)
        raise AssertionError(f"{text!r} not on the screen after {timeout:.0f} s:\n" + "\n".join(self.screen()))

    def close(self) -> None:
        try:
            self.tmux("kill-server")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
