"""Child processes that never outlive the test run.

Each child gets its own process group (so stopping it stops whatever it spawned) and is
killed by the kernel if the Python process dies without cleaning up (PR_SET_PDEATHSIG), on
top of the fixture's finalizer and an atexit hook.
"""

import atexit
import ctypes
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from bloomrun.trainer.elastic import free_ports  # the launchers' own, for the tests too

_PR_SET_PDEATHSIG = 1
_running: set["Child"] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel picks it)."""
    return free_ports(1)[0]


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    """One long-running program, its output appended to `log`."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None):
        self.name, self.argv, self.log, self.env = name, argv, log, env
        self.process: subprocess.Popen | None = None

    def start(self) -> "Child":
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True, preexec_fn=_die_with_parent,
            )
        _running.add(self)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_http_ok(self, url: str, timeout: float, what: str) -> None:
        """Waits until `url` answers 200; fails at once, with the log, if the program exits."""
        def answering() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False
        wait_until(answering, timeout, what)

    def stop(self, grace: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait()
        _signal_group(self.process.pid, signal.SIGKILL)  # stragglers it left behind
        _running.discard(self)
        self.process = None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2, check=None):
    """Polls `predicate` until it returns something truthy; `check()` may raise early."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@atexit.register
def _stop_all() -> None:
    for child in list(_running):
        child.stop(grace=3.0)
