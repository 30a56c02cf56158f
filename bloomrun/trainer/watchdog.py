"""Hang detection: a process beside each node's workers that ends the worker group when a
rank has made no progress for too long, naming the rank and the node.

Why a separate process reading heartbeats from shared memory (heartbeat.py), started by
local rank 0 for the life of its worker group: whatever stops a rank also stops every thread
in it. A SIGSTOP freezes the whole process; a rank spinning in Python holds the GIL; a rank
inside a gloo or NCCL collective whose peer is gone waits in C++. A watchdog thread in the
trainer would stall with it, as torch's own NCCL watchdog thread can, which is why
ProcessGroupNCCL adds a second heartbeat-monitor thread that kills the process when the
watchdog stops beating (TORCH_NCCL_ENABLE_MONITORING, TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC).
NVIDIA's resiliency extension goes one step further, as here: ft_launcher (torchrun's
replacement) starts a rank-monitor *process* per rank, ranks send heartbeats and open/close
named sections (setup, step, checkpointing) over a socket, timeouts are fixed or computed
from observed intervals, and the monitor kills its rank on a miss. torchft's Lighthouse
tracks heartbeats of replica groups and aborts the survivors' collectives. bloomrun needs no
launcher of its own (torchrun stays the pod's command) and no extra socket per rank: one
stdlib process per node, shared-memory records, and torchrun's own restart.

The decision (`assess`) is pure. A rank is *stalled* when its beat count has not changed for
its phase's timeout: max(k x the median step time, a floor) in a step, a fixed allowance in
start-up or a checkpoint save or load, so a slow save is not a hang. All ranks of a hung
group stall (the healthy ones wait in a collective), so the rank to blame is the one with
positive evidence: a process the kernel reports stopped, dead or in uninterruptible sleep,
else the rank behind its peers in beats. The watchdogs of a multi-node group meet in the
group's c10d store (`Peers`), so a node whose ranks only wait sees the other nodes' ranks and
names the one to blame; without the store (rank 0 is the one stopped) each node judges from
its own ranks.

What it does (`act`): SIGKILL every worker of the node (a stopped or hung process ignores
SIGTERM), so torchrun restarts the group from the newest checkpoint. In a pod, when the
culprit is local, it also writes `hung: <message>` as the container's termination message
and stops torchrun, so the pod fails and the operator classifies the failure `Hung` and
replaces the pod under its own backoff (docs/operator.md); a node that only waited restarts
its workers in place and rejoins the group.

    python -m bloomrun.trainer.watchdog --dir D --ranks A:B --agent-pid P --parent-pid Q ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bloomrun.trainer import heartbeat as hb

log = logging.getLogger("bloomrun.trainer.watchdog")

POLL_S = 0.5
# /proc states of a process that will not progress by itself: stopped (SIGSTOP), stopped by
# a tracer, zombie, dead, uninterruptible sleep (a hung driver call or I/O).
STUCK_STATES = {"T": "stopped", "t": "stopped by a tracer", "Z": "exited", "X": "dead",
                "D": "in uninterruptible sleep"}


@dataclass(frozen=True)
class Limits:
    step_time_factor: float
    min_timeout_s: float
    phase_timeout_s: float

    @classmethod
    def from_config(cls, watchdog) -> "Limits":
        """From the trainer config's WatchdogConfig section."""
        return cls(watchdog.step_time_factor, watchdog.min_timeout_seconds, watchdog.phase_timeout_seconds)


@dataclass(frozen=True)
class RankView:
    """One rank as the watchdog sees it now."""

    rank: int
    pid: int | None
    phase: int
    beats: int
    step: int
    median_step_s: float
    idle_s: float
    """Seconds since its beat count last changed (the watchdog's own clock)."""
    state: str = "?"
    """The process's /proc state letter ('?' when unknown)."""
    host: str = ""
    """The node it runs on."""


@dataclass(frozen=True)
class Verdict:
    suspects: tuple[RankView, ...]
    stalled: tuple[RankView, ...]
    evidence: str
    """Why the suspects are to blame ('' when nothing local points at anyone)."""


def timeout_s(view: RankView, limits: Limits) -> float:
    """How long this rank may go without a beat in its phase."""
    if view.phase == hb.DONE:
        return math.inf
    if view.phase == hb.STEP and view.median_step_s > 0:
        return max(limits.step_time_factor * view.median_step_s, limits.min_timeout_s)
    return limits.phase_timeout_s  # start-up and the first step (compilation), checkpoints


def assess(views: list[RankView], limits: Limits) -> Verdict | None:
    """None while every rank progresses; else the stalled ranks and whom to blame."""
    stalled = tuple(v for v in views if v.idle_s > timeout_s(v, limits))
    if not stalled:
        return None
    stuck = tuple(v for v in views if v.state in STUCK_STATES and v.phase != hb.DONE)  # not one that finished
    if stuck:
        return Verdict(stuck, stalled, "process " + ", ".join(sorted({STUCK_STATES[v.state] for v in stuck})))
    fewest = min(v.beats for v in views)
    behind = tuple(v for v in views if v.beats == fewest)
    if len(behind) < len(views):
        return Verdict(behind, stalled, "behind its peers, which wait for it")
    return Verdict(stalled, stalled, "")


def describe(verdict: Verdict, limits: Limits, host: str) -> str:
    """One line: who, where, for how long, against which bound."""
    first = verdict.suspects[0]
    bound = timeout_s(first, limits)
    if first.phase == hb.STEP and first.median_step_s > 0:
        rule = (f"max({limits.step_time_factor:g} x median step {first.median_step_s:.3g} s, "
                f"floor {limits.min_timeout_s:g} s)")
    else:
        rule = f"the {hb.PHASE_NAMES[first.phase]} allowance"
    who = ", ".join(f"rank {v.rank}" + (f" (pid {v.pid})" if v.pid else "") + f" on node {v.host or host}"
                    for v in verdict.suspects)
    if first.phase == hb.STEP:
        where = f"in step {first.step + 1}"
    else:
        where = f"in {hb.PHASE_NAMES[first.phase]}" + (f" after step {first.step}" if first.step else "")
    # The peers that wait for the rank to blame have waited no longer than it has stood still.
    idle = max(v.idle_s for v in (*verdict.suspects, *verdict.stalled))
    text = f"{who} made no progress for {idle:.1f} s {where} (timeout {bound:.1f} s = {rule})"
    if verdict.evidence:
        return f"{text}: {verdict.evidence}"
    return f"{text}: every rank of this node waits; the rank to blame is on another node"


# ------------------------------------------------------------------------ the process


class Tracker:
    """When each rank's beat count last changed, in this process's monotonic clock (the
    records' wall times are only for messages: a clock step must not fake a hang)."""

    def __init__(self, ranks: range, started: float, host: str = ""):
        self.ranks, self.host = ranks, host
        self._seen: dict[int, tuple[int, float]] = {rank: (-1, started) for rank in ranks}

    def observe(self, records: dict[int, hb.Record], now: float) -> list[RankView]:
        views = []
        for rank in self.ranks:
            record = records.get(rank)
            beats = record.beats if record else -1
            last_beats, since = self._seen[rank]
            if beats != last_beats:
                self._seen[rank] = (beats, now)
                since = now
            if record is None:  # not started yet: in start-up since the watchdog began
                views.append(RankView(rank, None, hb.STARTUP, -1, 0, 0.0, now - since, host=self.host))
            else:
                views.append(RankView(rank, record.pid, record.phase, record.beats, record.step,
                                      record.median_step_seconds, now - since, process_state(record.pid), self.host))
        return views


class Peers:
    """The other nodes' watchdogs, met in the worker group's c10d store (the TCPStore torch's
    init_process_group made at MASTER_ADDR:MASTER_PORT): each publishes its node's views every
    poll and reads the others', so a node whose ranks only wait can name the rank on another
    node that stopped, and only that node's pod is failed. Best effort: while the store does
    not answer (it lives in rank 0's process, which may be the one stopped) each node judges
    from its own ranks. Only multi-node groups pay for it (a torch import in the watchdog)."""

    KEY = "bloomrun/watchdog/node{}"

    def __init__(self, address: str, port: int, node: int, nodes: int, timeout_s: float = 2.0):
        self.address, self.port, self.node, self.nodes, self.timeout_s = address, port, node, nodes, timeout_s
        self._store = None
        self._seq = 0
        self._seen: dict[int, tuple[int, float]] = {}  # node -> (its seq, when it changed, our clock)
        self._call: threading.Thread | None = None  # the last exchange, maybe still waiting on the store

    def exchange(self, local: list[RankView], now: float) -> list[RankView]:
        """The other nodes' ranks, their idle time grown by how long their watchdog has been
        silent (a frozen node's last word ages in our clock); [] while the store does not
        answer within timeout_s. torch's TCPStore (2.15) waits for ever on a store whose
        process is stopped, whatever its timeout (measured: `check` on a connected client and a
        new client's handshake both still waiting after 60 s; a `set` returns), and the group's
        store lives in rank 0's process: each exchange runs on a thread of its own, and while
        one is stuck (rank 0 stopped) no other starts and this node judges from its own ranks."""
        if self._call is not None and self._call.is_alive():
            return []
        answer: list[list[RankView]] = []
        self._call = threading.Thread(target=lambda: answer.append(self._exchange(local, now)),
                                      name="watchdog-peers", daemon=True)
        self._call.start()
        self._call.join(self.timeout_s)
        return answer[0] if answer else []

    def _exchange(self, local: list[RankView], now: float) -> list[RankView]:
        try:
            store = self._connect()
            self._seq += 1
            store.set(self.KEY.format(self.node),
                      json.dumps({"seq": self._seq, "views": [dataclasses.asdict(v) for v in local]}))
            others = [n for n in range(self.nodes) if n != self.node]
            keys = [self.KEY.format(n) for n in others]
            if not keys or not store.check(keys):
                return []
            values = store.multi_get(keys)
        except (RuntimeError, OSError, ValueError) as err:  # torch raises DistStoreError (a RuntimeError)
            log.debug("peers unreachable: %s", err)
            self._store = None
            return []
        views = []
        for node, raw in zip(others, values):
            published = json.loads(raw)
            seq, since = self._seen.get(node, (None, now))
            if published["seq"] != seq:
                self._seen[node] = (published["seq"], now)
                since = now
            views += [RankView(**{**v, "idle_s": v["idle_s"] + now - since}) for v in published["views"]]
        return views

    def _connect(self):
        if self._store is None:
            from datetime import timedelta

            from torch.distributed import TCPStore

            self._store = TCPStore(self.address, self.port, is_master=False, wait_for_workers=False,
                                   timeout=timedelta(seconds=self.timeout_s))
        return self._store


def process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]  # the command may hold spaces and ')'
    except (OSError, IndexError):
        return "X"


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def act(verdict: Verdict, views: list[RankView], message: str, agent_pid: int, termination_log: str) -> bool:
    """Kill the node's workers (`views`: this node's ranks); in a pod whose rank is to blame,
    also end torchrun with the termination message. Returns whether the pod is being ended."""
    local = {v.rank for v in views}
    to_blame = bool(verdict.evidence) and any(v.rank in local for v in verdict.suspects)
    end_pod = to_blame and os.path.exists(termination_log)
    if end_pod:
        from bloomrun.trainer.train import HUNG_MARK

        try:
            with open(termination_log, "w") as f:
                f.write((HUNG_MARK + message)[:4096])  # the kubelet keeps 4096 bytes
        except OSError as err:
            log.warning("could not write %s: %s", termination_log, err)
            end_pod = False
    for view in views:
        # Only the agent's own children: a recycled pid of some other process is left alone.
        if view.pid and parent_of(view.pid) == agent_pid:
            try:
                os.kill(view.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if end_pod:
        os.kill(agent_pid, signal.SIGTERM)  # torchrun exits non-zero; the pod fails
    return end_pod


def watch(directory: Path, ranks: range, limits: Limits, agent_pid: int, parent_pid: int,
          termination_log: str, host: str, peers: Peers | None = None) -> int:
    """Poll until a hang (act, exit 0) or until the parent, local rank 0, is gone (exit 0)."""
    tracker = Tracker(ranks, time.monotonic(), host)
    try:
        log.info("watching ranks %d-%d on node %s: a step may go %g x its median without a beat (at least %g s), "
                 "start-up or a checkpoint %g s", ranks.start, ranks.stop - 1, host,
                 limits.step_time_factor, limits.min_timeout_s, limits.phase_timeout_s)
        while os.getppid() == parent_pid:
            now = time.monotonic()
            views = tracker.observe(hb.read_all(directory, ranks), now)
            verdict = assess(views + (peers.exchange(views, now) if peers else []), limits)
            if verdict is not None:
                message = describe(verdict, limits, host)
                log.error("hang: %s; stopping the worker group", message)
                ended = act(verdict, views, message, agent_pid, termination_log)
                log.error("hang: workers killed%s", ", torchrun stopped: the pod fails as Hung" if ended
                          else "; torchrun restarts them from the newest checkpoint")
                return 0
            if all(v.phase == hb.DONE for v in views):
                return 0
            time.sleep(POLL_S)
        return 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bloomrun.trainer.watchdog", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path, help="the group's heartbeat folder")
    parser.add_argument("--ranks", required=True, help="FIRST:END, this node's global ranks")
    parser.add_argument("--limits", required=True, help="JSON of Limits")
    parser.add_argument("--agent-pid", required=True, type=int, help="the torchrun agent")
    parser.add_argument("--parent-pid", required=True, type=int, help="local rank 0: the watchdog ends with it")
    parser.add_argument("--termination-log", required=True)
    parser.add_argument("--node", type=int, default=0, help="this node's group rank")
    parser.add_argument("--nodes", type=int, default=1, help="nodes in the group; more than one: meet their watchdogs")
    args = parser.parse_args(argv)
    first, end = (int(x) for x in args.ranks.split(":"))
    # The trainer's log format, as local rank 0 (which started it): bloomctl run shows such lines.
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {first}] %(levelname)s %(name)s: %(message)s")
    # Guard.close() ends us with SIGTERM: leave through `finally`, which removes the folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    peers = None
    if args.nodes > 1 and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        peers = Peers(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), args.node, args.nodes)
    return watch(args.dir, range(first, end), Limits(**json.loads(args.limits)), args.agent_pid,
                 args.parent_pid, args.termination_log, socket.gethostname(), peers)


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------------ in the trainer


class Guard:
    """A rank's side: its heartbeat, and on local rank 0 the watchdog process it started."""

    def __init__(self, heartbeat, process=None, directory: Path | None = None, ranks: range = range(0)):
        self.heartbeat = heartbeat
        self.process = process
        self.directory, self.ranks = directory, ranks

    def compute_seconds(self) -> dict[int, float]:
        """This node's ranks' compute time in their last step (local rank 0's metrics); a rank
        nobody watches knows only its own."""
        if self.directory is None:
            own = getattr(self.heartbeat, "compute_seconds", 0.0)
            return {self.heartbeat.rank: own} if own > 0 else {}
        return {rank: r.compute_seconds for rank, r in hb.read_all(self.directory, self.ranks).items()
                if r.compute_seconds > 0}

    def close(self) -> None:
        self.heartbeat.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except Exception:  # subprocess.TimeoutExpired: it is a daemon of ours, let it go
                pass


def guard(watchdog_config, rank: int, local_rank: int, local_world_size: int, env=os.environ) -> Guard:
    """Under torchrun (which restarts a group the watchdog ends) and when enabled: this rank's
    heartbeat, and on local rank 0 the node's watchdog. Otherwise a heartbeat that writes nothing."""
    if not watchdog_config.enabled or "TORCHELASTIC_RUN_ID" not in env:
        return Guard(hb.NullHeartbeat(rank))
    import subprocess

    from bloomrun.trainer.train import TERMINATION_LOG

    agent = os.getppid()  # torchrun's agent starts the workers
    directory = hb.group_dir(env, agent)
    directory.mkdir(mode=0o700, exist_ok=True)
    heartbeat = hb.Heartbeat(hb.rank_file(directory, rank), rank)
    if local_rank != 0:
        return Guard(heartbeat)
    hb.remove_stale_dirs(directory.parent)
    first = rank - local_rank  # torchrun numbers a node's ranks contiguously
    ranks = range(first, first + local_world_size)
    limits = Limits.from_config(watchdog_config)
    process = subprocess.Popen([
        sys.executable, "-m", "bloomrun.trainer.watchdog", "--dir", str(directory),
        "--ranks", f"{first}:{ranks.stop}", "--limits", json.dumps(dataclasses.asdict(limits)),
        "--agent-pid", str(agent), "--parent-pid", str(os.getpid()), "--termination-log", TERMINATION_LOG,
        "--node", env.get("GROUP_RANK", "0"), "--nodes", env.get("GROUP_WORLD_SIZE", "1"),
    ])
    return Guard(heartbeat, process, directory, ranks)
