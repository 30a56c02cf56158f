"""`bloomctl run examples/tiny.yaml` the way a person sees it: in a real terminal (tmux) at 80
and 160 columns, read back with `tmux capture-pane`. One live status line that never wraps
and is never left behind in copies, the trainer's lines cut to the width, none of DeepSpeed's
or torchrun's own output, and a final summary (or the resume hint after Ctrl-C)."""

import re
import subprocess
import time

import pytest

from tests.cli.elastic_harness import BLOOMCTL, REPO, launcher_env
from tests.cli.terminal import Tmux, find_tmux

MANIFEST = str(REPO / "examples" / "tiny.yaml")
# What DeepSpeed and torchrun print on their own (seen on first use, issue 12).
NOISE = re.compile(r"DeepSpeed|built successfully|untested optimizer|Traceback|torch\.distributed|"
                   r"SignalException|^[WIE]\d{4} |\[WARNING\]|\[INFO\]")
BAR = "━"


@pytest.fixture
def terminal(tmp_path):
    binary, env = find_tmux(REPO / ".cache")
    term = Tmux(binary, env, tmp_path / "tmux.sock")
    yield term
    term.close()


def run_in(terminal: Tmux, tmp_path, columns: int, *args: str) -> None:
    env = {"BLOOMRUN_CACHE": launcher_env()["BLOOMRUN_CACHE"]}
    terminal.start([BLOOMCTL, "run", MANIFEST, "--output", str(tmp_path / "run"), *args],
                   columns=columns, rows=30, cwd=tmp_path, env=env)


def check_screen(terminal: Tmux, columns: int) -> list[str]:
    """What every screen must satisfy; returns the whole scrollback."""
    lines = terminal.scrollback()
    shown = "\n".join(lines)
    assert len(lines) == len(terminal.scrollback(joined=True)), f"a line wrapped:\n{shown}"
    assert all(len(line) <= columns for line in lines), shown
    assert [line for line in lines if NOISE.search(line)] == [], shown
    bars = [line for line in lines if BAR in line]
    assert len(bars) == 1, f"the status line was left behind in copies:\n{shown}"
    return lines


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_complete_run_at_80_columns_shows_one_status_line_and_a_summary(terminal, tmp_path):
    run_in(terminal, tmp_path, 80, "--steps", "120")
    terminal.wait_for("EXIT=", 240)
    lines = check_screen(terminal, 80)
    shown = "\n".join(lines)
    assert "EXIT=0" in shown
    status = next(line for line in lines if BAR in line)
    assert re.search(r"step 120/120 loss \d+\.\d{4}  tokens/s [\d,]+  ETA 0:00$", status), status
    # logEvery 50: two step lines, shortened to time and message, then cut to the width.
    steps = [line for line in lines if re.match(r"^\d\d:\d\d:\d\d step \d+/120 \| loss", line)]
    assert [int(re.search(r"step (\d+)", line)[1]) for line in steps] == [50, 100], shown
    assert re.search(r"^tiny: complete at step 120 \(loss \d+\.\d{4}, 122,880 tokens\)$", shown, re.M), shown

    # The same command again: the run is complete, said at once, without starting torchrun
    # (which took ~28 s of start-up and logged a restart before).
    started = time.monotonic()
    again = subprocess.run([BLOOMCTL, "run", MANIFEST, "--output", str(tmp_path / "run"), "--steps", "120"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - started < 15
    assert re.fullmatch(r"tiny: already complete at step 120 \(loss \d+\.\d{4}, 122,880 tokens\)\n", again.stdout)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_at_160_columns_stops_without_a_traceback(terminal, tmp_path):
    run_in(terminal, tmp_path, 160, "--steps", "5000")
    terminal.wait_for("checkpoint step 50 saved", 240)
    terminal.tmux("send-keys", "-t", "run", "C-c")
    terminal.wait_for("EXIT=", 120)
    lines = check_screen(terminal, 160)
    shown = "\n".join(lines)
    assert "EXIT=130" in shown and "run the same command again to resume" in shown, shown
    assert re.search(r"SIGTERM: checkpoint at step \d+ saved, stopping", shown), shown
    # At 160 columns a step line is whole: nothing was cut.
    step_line = next(line for line in lines if re.match(r"^\d\d:\d\d:\d\d step 50/5000 ", line))
    assert step_line.endswith(" GB") and "…" not in step_line, step_line
