"""Hang detection on real torchrun groups (bloomrun/trainer/watchdog.py): a rank stopped with
SIGSTOP is found within its bound, named with its node, the group is torn down and torchrun
resumes it from the newest checkpoint; a slow checkpoint save is not taken for a hang."""

import json
import re
import signal
import socket
import time
import urllib.request
from datetime import datetime

import psutil
import pytest
import yaml

from bloomrun.operator.goodput import account
from bloomrun.operator.spec import Goodput, Progress
from tests.cli.elastic_harness import (
    BLOOMCTL,
    Started,
    launcher_env,
    newest_checkpoint_step,
    tiny_manifest,
    trainer_events,
    wait_until,
)
from tests.trainer.test_progress import env_for, fake_api, progress_of  # noqa: F401  (a fixture)

HANG_LINE = re.compile(r"^(\S+ \S+) \[rank \d+\] ERROR bloomrun.trainer.watchdog: hang: rank (\d+) \(pid (\d+)\) on node (\S+) made no progress for ([\d.]+) s in step (\d+) "
                       r"\(timeout ([\d.]+) s = max\(10 x median step [\d.e+-]+ s, floor 5 s\)\): process stopped", re.M)
POLL_S = 1.0  # the watchdog polls every 0.5 s, and a loaded machine may be late


def logged_at(stamp: str) -> float:
    """Unix time of a log line's stamp (local time, as logging writes it). Times are taken
    from the lines, not from when the test reads them: bloomctl relays lines with a delay."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def assert_goodput_counts_the_restart(reports: list[dict], resumed_step: int) -> None:
    """The operator's accounting (goodput.py) over the trainer's real reports, two devices
    held throughout: two sessions, the steps the second redid are lost, its start-up is
    restart overhead, and every step second the trainer reported is productive or lost."""
    progress, goodput, sessions = {}, None, []
    for report in reports:
        progress = {**progress, **report}
        now = datetime.fromisoformat(progress["updateTime"].replace("Z", "+00:00"))
        goodput = goodput or account(Goodput(), Progress(), devices=2, phase="Running", now=now)
        goodput = account(goodput, Progress.model_validate(progress), devices=2, phase="Running", now=now)
        if progress.get("startTime") and progress["startTime"] not in sessions:
            sessions.append(progress["startTime"])
    assert len(sessions) == 2 and progress["resumedStep"] == resumed_step
    assert goodput.lost > 0 and goodput.restart > 0 and goodput.checkpoint > 0
    # What the first session was credited before the lost steps left it (the second's is kept apart).
    first_session = goodput.productive + goodput.lost - goodput.session.productive
    assert first_session > goodput.lost > 0  # the lost steps are a share of the first session's
    assert 0 < goodput.ratio < 1
    print("goodput:", goodput.model_dump_json(include={"productive", "lost", "restart", "checkpoint", "other", "ratio"}))


def watched_manifest(tmp_path, *, steps: int, every: int, watchdog: dict):
    manifest = tiny_manifest(tmp_path, steps=steps, every=every)
    document = yaml.safe_load(manifest.read_text())
    document["spec"]["watchdog"] = watchdog
    manifest.write_text(yaml.safe_dump(document))
    return manifest


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_stopped_rank_is_named_within_its_bound_and_the_group_resumes_from_the_newest_checkpoint(tmp_path, fake_api):
    steps, every = 120, 10
    manifest = watched_manifest(tmp_path, steps=steps, every=every,
                                watchdog={"stepTimeFactor": 10, "minTimeoutSeconds": 5, "phaseTimeoutSeconds": 300})
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    # Rank 0 reports progress to a stand-in API server, as in a pod: goodput is replayed from it below.
    url, patches = fake_api
    env = {**launcher_env(), **env_for(url, tmp_path, BLOOMRUN_RUN_NAME="tiny", BLOOMRUN_PROGRESS_INTERVAL="1")}
    run = Started([BLOOMCTL, "run", str(manifest), "--max-restarts", "2"], tmp_path / "run.log", env, cwd=tmp_path)
    try:
        # Mid-way between two checkpoints, so that the rank is stopped inside a step.
        wait_until(lambda: run.last_step() >= 23 and run.last_step() % every in (3, 4, 5, 6), 240, "steps")
        assert "watching ranks 0-1 on node" in run.text()
        workers = run.workers()
        assert len(workers) == 2, run.tail()
        victim = workers[1]  # local rank 1 = rank 1: torchrun starts them in order
        victim.send_signal(signal.SIGSTOP)
        stopped_at, stopped_step = time.time(), run.last_step()
        newest = newest_checkpoint_step(checkpoints)
        assert newest >= 10, (sorted(p.name for p in checkpoints.parent.rglob("*")), run.tail())
        found = wait_until(lambda: HANG_LINE.search(run.text()), 120, "the watchdog's verdict")
        stamp, rank, pid, host, idle, step, timeout = found.groups()
        detected_s = logged_at(stamp) - stopped_at
        assert (int(rank), int(pid), host) == (1, victim.pid, socket.gethostname())
        assert int(step) in (stopped_step + 1, stopped_step + 2)  # the step it was in (or its peer's log lagged)
        assert float(timeout) <= float(idle) < float(timeout) + 1
        assert float(timeout) - 0.5 <= detected_s <= float(timeout) + POLL_S, (detected_s, timeout)
        # The group is torn down (a stopped process ignores SIGTERM: it was SIGKILLed) ...
        wait_until(lambda: not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE, 30,
                   "the stopped rank gone")
        # ... and torchrun's new group resumes from the newest complete checkpoint and steps again.
        wait_until(lambda: run.resumed_steps() and run.steps_since_last_start(), 240, "a step after the restart")
        kinds = [(kind, stamp) for stamp, kind, _ in trainer_events(run)]
        resumed_at = [k for k, _ in kinds].index("resumed")
        stepping_s = logged_at(next(stamp for kind, stamp in kinds[resumed_at:] if kind == "step")) - stopped_at
        assert run.resumed_steps() == [newest] and run.steps_since_last_start()[0] == newest + 1, run.tail()
        assert run.wait(300) == 0, run.tail()
    finally:
        run.kill_all()
    assert run.last_step() == steps and run.text().count("hang:") == 2  # the verdict and the action, once
    assert_goodput_counts_the_restart([progress_of(patch) for *_, patch in patches], newest)
    print("hang recovery:", json.dumps({"timeout_s": float(timeout), "detected_s": round(detected_s, 1),
                                        "stepping_again_s": round(stepping_s, 1), "resumed_step": newest}))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_checkpoint_save_slower_than_the_step_timeout_is_not_a_hang(tmp_path):
    """Rank 0 spends 8 s in each save while the step timeout is 3 s: the ranks beat the
    checkpoint phase (rank 1 waits in the save's collectives), whose allowance is 120 s
    (start-up has the same allowance and takes up to ~50 s on this VM under load)."""
    manifest = watched_manifest(tmp_path, steps=30, every=10,
                                watchdog={"stepTimeFactor": 2, "minTimeoutSeconds": 3, "phaseTimeoutSeconds": 120})
    env = {**launcher_env(), "BLOOMRUN_TEST_SLOW_SAVE_S": "8"}
    run = Started([BLOOMCTL, "run", str(manifest), "--max-restarts", "0"], tmp_path / "run.log", env, cwd=tmp_path)
    try:
        # Meanwhile local rank 0 exports every local rank's compute time from its heartbeat.
        wait_until(lambda: run.last_step() >= 3, 240, "steps")
        port = (tmp_path / "runs" / "tiny" / "metrics-port").read_text().strip()
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        compute = dict(re.findall(r'^bloomrun_train_rank_compute_seconds\{[^}]*rank="(\d)"[^}]*\} (\S+)$', scraped, re.M))
        assert set(compute) == {"0", "1"} and all(float(v) > 0 for v in compute.values()), scraped
        assert f'host="{socket.gethostname()}"' in scraped
        assert run.wait(400) == 0, run.tail()
    finally:
        run.kill_all()
    text = run.text()
    assert "watching ranks 0-1 on node" in text and "hang:" not in text and not run.resumed_steps()
    saves = [float(s) for s in re.findall(r"checkpoint step \d+ saved to \S+ in ([\d.]+) s", text)]
    assert len(saves) == 3 and min(saves) >= 8, saves  # each save really outlasted the step timeout


def stepped_after_resume(events) -> bool:
    """A step logged after a resume (events: time-ordered (time, kind, value))."""
    kinds = [kind for _, kind, _ in events]
    return "resumed" in kinds and "step" in kinds[kinds.index("resumed"):]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_node_whose_rank_waits_names_the_stopped_rank_of_the_other_node(tmp_path):
    """Two torchrun agents ("nodes", one rank each): the watchdogs meet in the group's store.
    Node B's rank is stopped, then node B's watchdog too (a frozen node): node A's watchdog,
    whose own rank only waits, names rank 1 with its pid and node from B's last report."""
    from tests.cli.test_elastic_scale import Cluster

    cluster = Cluster(tmp_path)
    config = json.loads(cluster.config.read_text())
    config["watchdog"] = {"stepTimeFactor": 10, "minTimeoutSeconds": 5, "phaseTimeoutSeconds": 300}
    cluster.config.write_text(json.dumps(config))
    try:
        node_a = cluster.agent("a", is_host=True)
        node_b = cluster.agent("b", is_host=False)
        wait_until(lambda: (cluster.last("step") or 0) >= 13 and cluster.last("step") % 10 in (3, 4, 5, 6), 300,
                   "two nodes training")
        victim = node_b.workers()[0]
        watchdog_b = next(p for p in victim.children() if "bloomrun.trainer.watchdog" in " ".join(p.cmdline()))
        victim.send_signal(signal.SIGSTOP)
        time.sleep(2)  # B's watchdog reports its rank stopped at least once ...
        watchdog_b.send_signal(signal.SIGSTOP)  # ... then freezes with its node
        found = wait_until(lambda: HANG_LINE.search(node_a.text()), 60, "node A's verdict")
        _stamp, rank, pid, host = found.groups()[:4]
        assert (int(rank), int(pid), host) == (1, victim.pid, socket.gethostname())
        assert "hang:" not in node_b.text()
        watchdog_b.send_signal(signal.SIGCONT)  # B wakes up, finds its rank stopped and ends it
        wait_until(lambda: stepped_after_resume(cluster.events()), 240, "training again")
    finally:
        for agent in cluster.started:
            agent.kill_all()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_stopped_rank_0_is_named_by_its_own_node(tmp_path):
    """Two torchrun agents, one rank each; rank 0 is stopped (the rank that reports progress
    and writes checkpoints, on whichever node the rendezvous put it: in a pod, often not
    worker-0). Its node's watchdog names it; the group resumes."""
    from tests.cli.test_elastic_scale import Cluster

    cluster = Cluster(tmp_path)
    config = json.loads(cluster.config.read_text())
    config["watchdog"] = {"stepTimeFactor": 10, "minTimeoutSeconds": 5, "phaseTimeoutSeconds": 300}
    cluster.config.write_text(json.dumps(config))
    try:
        nodes = [cluster.agent("a", is_host=True), cluster.agent("b", is_host=False)]
        wait_until(lambda: (cluster.last("step") or 0) >= 13 and cluster.last("step") % 10 in (3, 4, 5, 6), 300,
                   "two nodes training")
        node, victim = next((n, w) for n in nodes for w in n.workers() if w.environ().get("RANK") == "0")
        victim.send_signal(signal.SIGSTOP)
        try:
            found = wait_until(lambda: HANG_LINE.search(node.text()), 60, "rank 0's node's verdict")
        except TimeoutError as err:
            raise AssertionError(f"{err}\n" + "\n".join(n.text()[-3000:] for n in nodes)) from None
        _stamp, rank, pid, host = found.groups()[:4]
        assert (int(rank), int(pid), host) == (0, victim.pid, socket.gethostname())
        wait_until(lambda: stepped_after_resume(cluster.events()), 240, "training again")
    finally:
        for agent in cluster.started:
            agent.kill_all()
