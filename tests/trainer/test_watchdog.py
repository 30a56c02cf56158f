"""The hang watchdog's pure parts and its shared-memory heartbeats: no torchrun needed (the
real groups are in tests/cli/test_hang_watchdog.py)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from bloomrun.trainer import heartbeat as hb
from bloomrun.trainer import watchdog as wd
from bloomrun.trainer.config import TrainerConfig, WatchdogConfig, format_validation_error
from pydantic import ValidationError

from tests.cluster.processes import wait_until

LIMITS = wd.Limits(step_time_factor=10, min_timeout_s=60, phase_timeout_s=1800)


def view(rank, idle, beats=100, phase=hb.STEP, median=0.3, state="S", step=41):
    return wd.RankView(rank=rank, pid=1000 + rank, phase=phase, beats=beats, step=step, median_step_s=median,
                       idle_s=idle, state=state)


def test_the_step_timeout_is_k_times_the_median_with_a_floor_and_phases_have_their_own():
    assert wd.timeout_s(view(0, 0, median=0.3), LIMITS) == 60  # 10 x 0.3 s is under the floor
    assert wd.timeout_s(view(0, 0, median=30), LIMITS) == 300
    assert wd.timeout_s(view(0, 0, median=0), LIMITS) == 1800  # the first step: compilation
    for phase in (hb.STARTUP, hb.CHECKPOINT):
        assert wd.timeout_s(view(0, 0, phase=phase, median=30), LIMITS) == 1800
    assert wd.timeout_s(view(0, 10**9, phase=hb.DONE), LIMITS) == float("inf")


def test_nothing_is_stalled_until_some_rank_passes_its_timeout():
    assert wd.assess([view(0, 59.9), view(1, 59.9)], LIMITS) is None
    # A rank 20 minutes into a checkpoint save is within its allowance.
    assert wd.assess([view(0, 1200, phase=hb.CHECKPOINT), view(1, 1200, phase=hb.CHECKPOINT)], LIMITS) is None


def test_a_stopped_process_is_blamed_over_peers_that_are_merely_waiting():
    verdict = wd.assess([view(0, 61, beats=120), view(1, 61, beats=120, state="T")], LIMITS)
    assert [v.rank for v in verdict.suspects] == [1] and verdict.evidence == "process stopped"
    assert [v.rank for v in verdict.stalled] == [0, 1]


def test_a_rank_that_finished_and_exited_is_not_blamed_for_a_peers_stall():
    verdict = wd.assess([view(0, 10**4, phase=hb.DONE, state="X", beats=130), view(1, 61, beats=120)], LIMITS)
    assert [v.rank for v in verdict.suspects] == [1] and "behind its peers" in verdict.evidence


def test_without_a_process_state_the_rank_behind_its_peers_is_blamed():
    # Rank 2 never reached the beat before the collective its peers wait in.
    verdict = wd.assess([view(0, 65, beats=120), view(1, 65, beats=120), view(2, 66, beats=117)], LIMITS)
    assert [v.rank for v in verdict.suspects] == [2] and "behind its peers" in verdict.evidence


def test_ranks_all_waiting_together_blame_nobody_here():
    verdict = wd.assess([view(0, 61), view(1, 61)], LIMITS)
    assert verdict.evidence == "" and [v.rank for v in verdict.suspects] == [0, 1]
    assert "on another node" in wd.describe(verdict, LIMITS, "gpu-3")


def test_the_message_names_the_rank_its_node_the_step_and_the_bound():
    verdict = wd.assess([view(0, 61.2, beats=120), view(1, 61.2, beats=120, state="T")], LIMITS)
    assert wd.describe(verdict, LIMITS, "gpu-7") == (
        "rank 1 (pid 1001) on node gpu-7 made no progress for 61.2 s in step 42 "
        "(timeout 60.0 s = max(10 x median step 0.3 s, floor 60 s)): process stopped")
    saving = wd.assess([view(0, 1801, phase=hb.CHECKPOINT, state="D")], LIMITS)
    assert "in checkpoint after step 41 (timeout 1800.0 s = the checkpoint allowance)" in wd.describe(saving, LIMITS, "n")


def test_idle_time_is_counted_from_the_last_change_of_the_beat_count_in_the_watchdogs_clock():
    tracker = wd.Tracker(range(0, 2), started=100.0)
    record = hb.Record(rank=0, pid=os.getpid(), phase=hb.STEP, beats=5, step=2, time=0.0, compute_seconds=0.1,
                       median_step_seconds=0.2)
    views = tracker.observe({0: record}, now=101.0)
    assert views[0].idle_s == 0 and views[1].idle_s == 1.0 and views[1].phase == hb.STARTUP  # rank 1 not started
    views = tracker.observe({0: record}, now=111.0)  # the same count (its wall time is ignored)
    assert views[0].idle_s == 10.0 and views[0].state in ("R", "S")
    views = tracker.observe({0: record.__class__(**{**record.__dict__, "beats": 6})}, now=112.0)
    assert views[0].idle_s == 0


def test_heartbeats_round_trip_through_shared_memory_and_keep_their_median(tmp_path):
    beat = hb.Heartbeat(tmp_path / "rank3", rank=3)
    assert hb.read(tmp_path / "rank3").phase == hb.STARTUP
    for step, seconds in enumerate([0.2, 0.4, 0.3, 9.0], start=1):
        beat.step_done(step, seconds, compute_seconds=seconds / 2)
    with beat.phase_of(hb.CHECKPOINT):
        inside = hb.read(tmp_path / "rank3")
    after = hb.read(tmp_path / "rank3")
    assert (inside.phase, after.phase, after.step, after.rank, after.pid) == (hb.CHECKPOINT, hb.STEP, 4, 3, os.getpid())
    assert after.median_step_seconds == pytest.approx(0.35) and after.compute_seconds == pytest.approx(4.5)
    assert after.beats == inside.beats + 1
    beat.close()
    assert hb.read(tmp_path / "rank3").phase == hb.DONE
    assert hb.read(tmp_path / "absent") is None


def test_a_rank_nobody_watches_still_reports_its_own_compute_time():
    # No torchrun (bloomctl-less runs, the Prometheus test's trainer): no heartbeat folder,
    # but the straggler metric must not go silent.
    guard = wd.guard(WatchdogConfig(), rank=3, local_rank=0, local_world_size=1, env={})
    assert guard.compute_seconds() == {}  # before the first step
    guard.heartbeat.step_done(1, seconds=0.5, compute_seconds=0.25)
    assert guard.compute_seconds() == {3: 0.25}


def test_the_config_section_has_defaults_and_refuses_bad_values_naming_the_field():
    assert TrainerConfig.model_validate({"data": {"sources": [{"path": "d"}]}, "training": {"trainSteps": 1}}
                                        ).watchdog == WatchdogConfig()
    for bad, field in (({"stepTimeFactor": 1}, "stepTimeFactor"), ({"minTimeoutSeconds": 0}, "minTimeoutSeconds"),
                       ({"minTimeoutSeconds": 600, "phaseTimeoutSeconds": 60}, "phaseTimeoutSeconds"),
                       ({"timeout": 5}, "timeout")):
        with pytest.raises(ValidationError) as err:
            WatchdogConfig.model_validate(bad)
        assert field in format_validation_error(err.value)


def test_the_watchdog_process_kills_a_stopped_worker_and_names_it(tmp_path):
    """The process itself, on a fake group: this test is the 'agent', two sleeping children
    are the workers with heartbeats, one is stopped; the watchdog must SIGKILL both."""
    directory = tmp_path / "group"
    directory.mkdir()
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(directory), str(rank)]) for rank in (0, 1)]
    try:
        time.sleep(1.5)  # they beat
        os.kill(workers[1].pid, signal.SIGSTOP)
        started = time.monotonic()
        limits = '{"step_time_factor": 2, "min_timeout_s": 2, "phase_timeout_s": 30}'
        out = subprocess.run([sys.executable, "-m", "bloomrun.trainer.watchdog", "--dir", str(directory),
                              "--ranks", "0:2", "--limits", limits, "--agent-pid", str(os.getpid()),
                              "--parent-pid", str(os.getpid()), "--termination-log", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
        assert out.returncode == 0, out.stderr
        assert f"hang: rank 1 (pid {workers[1].pid}) on node" in out.stderr and "process stopped" in out.stderr
        assert 2 <= elapsed < 2 + 3  # the 2 s floor, a poll, the start
        assert [w.wait(10) for w in workers] == [-signal.SIGKILL, -signal.SIGKILL]
        assert not (tmp_path / "none").exists()  # not a pod: no termination message
        assert not directory.exists()  # it cleans up after itself
    finally:
        for worker in workers:
            worker.kill()


def test_in_a_pod_the_culprits_node_writes_the_hung_mark_and_stops_torchrun(tmp_path):
    from bloomrun.trainer.train import HUNG_MARK

    directory = tmp_path / "group"
    directory.mkdir()
    log = tmp_path / "termination-log"
    log.write_text("")  # the kubelet's file exists in a pod
    # The 'agent': a process whose SIGTERM we can observe, parent of the workers.
    agent = subprocess.Popen([sys.executable, "-c", AGENT, str(directory)], stdout=subprocess.PIPE, text=True)
    pids = []
    try:
        pids = [int(agent.stdout.readline()) for _ in range(2)]
        time.sleep(1.5)
        os.kill(pids[0], signal.SIGSTOP)
        limits = '{"step_time_factor": 2, "min_timeout_s": 2, "phase_timeout_s": 30}'
        out = subprocess.run([sys.executable, "-m", "bloomrun.trainer.watchdog", "--dir", str(directory),
                              "--ranks", "0:2", "--limits", limits, "--agent-pid", str(agent.pid),
                              "--parent-pid", str(os.getpid()), "--termination-log", str(log)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert agent.wait(10) == -signal.SIGTERM
        message = log.read_text()
        assert message.startswith(HUNG_MARK + f"rank 0 (pid {pids[0]}) on node ") and "process stopped" in message
    finally:
        agent.kill()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# A worker: beats every 0.1 s, as a rank between micro-batches would.
WORKER = """
import sys, time
from pathlib import Path
from bloomrun.trainer import heartbeat as hb
beat = hb.Heartbeat(hb.rank_file(Path(sys.argv[1]), int(sys.argv[2])), int(sys.argv[2]))
for step in range(1, 10**6):
    beat.step_done(step, 0.1, 0.05)
    time.sleep(0.1)
"""
# An agent: starts two workers, prints their pids, waits (SIGTERM ends it).
AGENT = """
import subprocess, sys, time
procs = [subprocess.Popen([sys.executable, "-c", %r, sys.argv[1], str(rank)]) for rank in (0, 1)]
for p in procs:
    print(p.pid, flush=True)
time.sleep(600)
""" % WORKER


def test_watchdogs_of_two_nodes_meet_in_the_groups_store_and_blame_the_stopped_rank_elsewhere():
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    node0 = wd.Peers("127.0.0.1", store.port, node=0, nodes=2, timeout_s=30)  # a loaded machine
    node1 = wd.Peers("127.0.0.1", store.port, node=1, nodes=2, timeout_s=30)
    waiting = [wd.RankView(0, 100, hb.STEP, 120, 41, 0.3, 61.0, "S", "gpu-0")]
    stopped = [wd.RankView(1, 200, hb.STEP, 120, 41, 0.3, 60.5, "T", "gpu-1")]
    assert node0.exchange(waiting, now=10.0) == []  # node 1 has not published yet
    assert node1.exchange(stopped, now=10.0) == waiting
    remote = node0.exchange(waiting, now=10.5)
    assert remote == stopped
    verdict = wd.assess(waiting + remote, LIMITS)
    assert [(v.rank, v.host) for v in verdict.suspects] == [(1, "gpu-1")] and verdict.evidence == "process stopped"
    assert wd.describe(verdict, LIMITS, "gpu-0").startswith("rank 1 (pid 200) on node gpu-1 made no progress")
    # Node 1's watchdog falls silent (its node froze): its last word ages in node 0's clock.
    assert node0.exchange(waiting, now=40.5)[0].idle_s == pytest.approx(60.5 + 30)


STORE_SERVER = """
import sys, time
from datetime import timedelta
from torch.distributed import TCPStore
store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
print(store.port, flush=True)
time.sleep(600)
"""


def test_a_stopped_store_never_holds_up_the_watchdog_and_it_meets_its_peers_again_after():
    """The group's store lives in rank 0's process: when rank 0 is the rank stopped, a store
    call waits for ever (torch 2.15 ignores the timeout there), which froze the watchdog of
    rank 0's own node, so no one named the stopped rank (seen on real pods)."""
    server = subprocess.Popen([sys.executable, "-c", STORE_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        node0 = wd.Peers("127.0.0.1", port, node=0, nodes=2, timeout_s=30)
        node1 = wd.Peers("127.0.0.1", port, node=1, nodes=2, timeout_s=30)
        mine = [wd.RankView(0, 100, hb.STEP, 120, 41, 0.3, 1.0, "T", "gpu-0")]
        theirs = [wd.RankView(1, 200, hb.STEP, 120, 41, 0.3, 1.0, "S", "gpu-1")]
        node0.exchange(mine, now=1.0)
        assert node1.exchange(theirs, now=1.0) == mine  # connected, both published
        node0.timeout_s = node1.timeout_s = 1.0
        server.send_signal(signal.SIGSTOP)
        for now in (2.0, 3.0, 4.0):  # each poll returns: stuck on the store first, then skipped
            began = time.monotonic()
            assert node0.exchange(mine, now=now) == []
            assert time.monotonic() - began < 3.0
        server.send_signal(signal.SIGCONT)
        node0.timeout_s = 30
        wait_until(lambda: [(v.rank, v.host) for v in node0.exchange(mine, now=5.0)] == [(1, "gpu-1")], 60,
                   "the peers met again")
    finally:
        server.kill()


def test_only_the_node_of_the_rank_to_blame_ends_its_pod(tmp_path):
    log = tmp_path / "termination-log"
    log.write_text("")
    stopped_elsewhere = wd.Verdict((wd.RankView(1, 200, hb.STEP, 120, 41, 0.3, 61, "T", "gpu-1"),), (), "process stopped")
    # This node holds rank 0 only (pid None: nothing to kill here in the test).
    mine = [wd.RankView(0, None, hb.STEP, 120, 41, 0.3, 61, "S", "gpu-0")]
    assert wd.act(stopped_elsewhere, mine, "m", agent_pid=os.getpid(), termination_log=str(log)) is False
    assert log.read_text() == ""  # the waiting node restarts in place; its pod is not failed


def test_folders_of_groups_whose_agent_is_gone_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"bloomrun-heartbeat-{dead.pid}-0-1234").mkdir()
    (tmp_path / f"bloomrun-heartbeat-{os.getpid()}-0-1234").mkdir()
    (tmp_path / "bloomrun-heartbeat-odd").mkdir()
    hb.remove_stale_dirs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"bloomrun-heartbeat-{os.getpid()}-0-1234",
                                                                 "bloomrun-heartbeat-odd"])


def test_a_watchdog_ended_by_its_rank_removes_the_groups_folder(tmp_path):
    directory = tmp_path / "group"
    directory.mkdir()
    limits = '{"step_time_factor": 2, "min_timeout_s": 60, "phase_timeout_s": 600}'
    watchdog = subprocess.Popen([sys.executable, "-m", "bloomrun.trainer.watchdog", "--dir", str(directory),
                                 "--ranks", "0:1", "--limits", limits, "--agent-pid", str(os.getpid()),
                                 "--parent-pid", str(os.getpid()), "--termination-log", str(tmp_path / "none")],
                                stderr=subprocess.PIPE, text=True)
    try:
        assert "watching ranks 0-0" in watchdog.stderr.readline()
        watchdog.terminate()  # what Guard.close() does at the end of training
        assert watchdog.wait(10) == 0 and not directory.exists()
    finally:
        watchdog.kill()
