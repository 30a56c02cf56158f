"""Elastic scale-down and scale-up with two torchrun agents (two "nodes" on this machine,
one worker each, --nnodes=1:2, one rendezvous endpoint). Losing a node leaves the other
training alone from the newest checkpoint; the node coming back joins the running group.

Issue 2 saw a node joining a running group deadlock with torchrun's defaults (restarted
workers read dead peers' addresses from the shared store, pytorch#135712) and a scale-down
take 46 s; the launcher's settings fix both (bloomrun/trainer/elastic.py)."""

import json
import os
import re
import signal
import sys
import time
import uuid

import pytest

from bloomrun.cli import launch
from bloomrun.operator.spec import load_manifest
from bloomrun.trainer import elastic
from bloomrun.trainer.resolve import resolve_config
from tests.cli.elastic_harness import (
    Started,
    complete_checkpoint_steps,
    newest_checkpoint_step,
    tiny_manifest,
    trainer_events,
    wait_until,
)

EVERY = 10
STEPS = 100_000  # never reached: the test stops both nodes once it has seen a rejoin


def write_config(tmp_path):
    config = load_manifest(tiny_manifest(tmp_path, steps=STEPS, every=EVERY)).spec.trainer_config()
    resolved = resolve_config(config, base_dir=tmp_path, checkpoint_dir=tmp_path / "checkpoints", metrics_port=0)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(resolved.model_dump(mode="json", by_alias=True)))  # JSON is YAML
    return path


class Cluster:
    """Two agents on one rendezvous endpoint; node A hosts the rendezvous store."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.config = write_config(tmp_path)
        self.endpoint = f"127.0.0.1:{elastic.free_ports(1)[0]}"
        self.run_id = f"scale-{uuid.uuid4().hex[:8]}"
        self.started: list[Started] = []

    def agent(self, name: str, is_host: bool) -> Started:
        cache = elastic.cache_dir(os.environ)
        command = elastic.build_torchrun_command(elastic.Launch(
            str(self.config),
            elastic.Rendezvous(self.endpoint, self.run_id, nnodes="1:2", is_host=is_host),
            nproc=1,
            max_restarts=3,
            launcher=(sys.executable, "-m", "torch.distributed.run"),
            log_dir=str(cache / "torchrun"),
        ))
        # Two agents share the 2 cores: one thread per worker.
        env = launch.build_worker_env(os.environ, cache=cache, nproc=1, num_cpus=1, run_name="scale",
                                      metrics_port_file=self.tmp / f"{name}.metrics-port")
        started = Started(command, self.tmp / f"{name}.log", env)
        self.started.append(started)
        return started

    def events(self):
        return trainer_events(*self.started)

    def last(self, kind: str):
        values = [value for _, k, value in self.events() if k == kind]
        return values[-1] if values else None

    def starts(self) -> list[tuple[int, int]]:
        """(world size, resumed step or 0) of each worker-group start, in order."""
        result, world = [], None
        for _, kind, value in self.events():
            if kind == "world":
                world = value
                result.append((world, 0))
            elif kind == "resumed" and result:
                result[-1] = (world, value)
        return result

    def steps_after_start(self, index: int) -> list[int]:
        seen, steps = -1, []
        for _, kind, value in self.events():
            if kind == "world":
                seen += 1
            elif kind == "step" and seen == index:
                steps.append(value)
        return steps


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_node_lost_leaves_the_other_training_and_a_node_returning_rejoins(tmp_path):
    cluster = Cluster(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    timings = {}
    try:
        node_a = cluster.agent("a", is_host=True)
        node_b = cluster.agent("b", is_host=False)
        wait_until(lambda: cluster.starts() and newest_checkpoint_step(checkpoints) >= EVERY, 240, "two nodes training")
        assert cluster.starts()[0] == (2, 0)

        # Scale down: node B is lost (its agent and worker die at once).
        before = newest_checkpoint_step(checkpoints)
        old = {worker.pid for worker in node_a.workers()}
        lost, lost_wall = time.monotonic(), time.time()
        node_b.kill_all()
        respawned = wait_until(lambda: [w for w in node_a.workers() if w.pid not in old], 120, "A's new worker")
        timings["scale_down_respawn_s"] = round(respawned[0].create_time() - lost_wall, 1)
        wait_until(lambda: len(cluster.starts()) >= 2 and cluster.steps_after_start(1), 180, "node A alone")
        timings["scale_down_s"] = round(time.monotonic() - lost, 1)
        world, resumed = cluster.starts()[1]
        assert world == 1 and resumed >= before and resumed in complete_checkpoint_steps(checkpoints)
        assert cluster.steps_after_start(1)[0] == resumed + 1

        # A trains alone far enough to publish a checkpoint of its own.
        wait_until(lambda: newest_checkpoint_step(checkpoints) >= resumed + EVERY, 120, "a checkpoint by node A alone")

        # Scale up: node B comes back and joins; A's worker checkpoints and restarts with it.
        old = {worker.pid for worker in node_a.workers()}
        returned, returned_wall = time.monotonic(), time.time()
        cluster.agent("b-again", is_host=False)
        respawned = wait_until(lambda: [w for w in node_a.workers() if w.pid not in old], 120, "A's new worker")
        timings["scale_up_respawn_s"] = round(respawned[0].create_time() - returned_wall, 1)
        wait_until(lambda: len(cluster.starts()) >= 3 and cluster.steps_after_start(2), 240, "node B rejoining")
        timings["scale_up_s"] = round(time.monotonic() - returned, 1)
        world, rejoined_at = cluster.starts()[2]
        assert world == 2 and rejoined_at in complete_checkpoint_steps(checkpoints)
        assert rejoined_at >= resumed + EVERY
        assert cluster.steps_after_start(2)[0] == rejoined_at + 1
        assert len(cluster.starts()) == 3  # no further restarts along the way

        # Both nodes stop on SIGTERM (a rollout) with a checkpoint ahead of the rejoin.
        wait_until(lambda: newest_checkpoint_step(checkpoints) > rejoined_at, 120, "a checkpoint by both nodes")
        for agent in cluster.started[-1], node_a:
            agent.signal(signal.SIGTERM)
        for agent in cluster.started[-1], node_a:
            agent.wait(120)
        assert newest_checkpoint_step(checkpoints) > rejoined_at
    finally:
        for agent in cluster.started:
            agent.kill_all()
        print("elastic timings:", json.dumps(timings), "starts:", cluster.starts())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_node_stopped_with_sigterm_leaves_the_other_training_from_the_stop_checkpoint(tmp_path):
    """A pod deleted by Kubernetes gets SIGTERM: the group agrees to stop and saves, the
    stopped node exits 0, and the other node's workers exit 75 so its torchrun re-forms the
    group alone instead of ending the run as if training had finished."""
    cluster = Cluster(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    try:
        node_a = cluster.agent("a", is_host=True)
        node_b = cluster.agent("b", is_host=False)
        wait_until(lambda: cluster.starts() and newest_checkpoint_step(checkpoints) >= EVERY, 240, "two nodes training")
        node_b.signal(signal.SIGTERM)
        node_b.wait(120)
        stop_step = newest_checkpoint_step(checkpoints)
        wait_until(lambda: len(cluster.starts()) >= 2 and cluster.steps_after_start(1), 180, "node A alone")
        world, resumed = cluster.starts()[1]
        assert world == 1
        assert resumed == stop_step, "A must resume from the checkpoint the SIGTERM stop saved"
        assert cluster.steps_after_start(1)[0] == resumed + 1
        assert node_a.proc.poll() is None, "node A's torchrun must still be running"
    finally:
        for agent in cluster.started:
            agent.kill_all()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_with_the_store_apart_losing_the_first_node_leaves_the_other_training(tmp_path):
    """What pods do (bloomrun/trainer/rendezvous_store.py): the c10d store runs apart and every
    agent joins it. Losing the first node, which used to host the store and take the
    rendezvous with it (the other agent exited within a second), leaves the other training."""
    cluster = Cluster(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    port = cluster.endpoint.rsplit(":", 1)[1]
    store = Started([sys.executable, "-m", "bloomrun.trainer.rendezvous_store", f"--port={port}"],
                    tmp_path / "store.log", dict(os.environ))
    try:
        wait_until(lambda: "listening" in store.text(), 60, "the store")
        node_a = cluster.agent("a", is_host=False)
        node_b = cluster.agent("b", is_host=False)
        wait_until(lambda: cluster.starts() and newest_checkpoint_step(checkpoints) >= EVERY, 240, "two nodes training")
        assert cluster.starts()[0] == (2, 0)
        before = newest_checkpoint_step(checkpoints)
        node_a.kill_all()  # the first node: agent and worker at once
        wait_until(lambda: len(cluster.starts()) >= 2 and cluster.steps_after_start(1), 180, "node B alone")
        world, resumed = cluster.starts()[1]
        assert world == 1 and resumed >= before and node_b.proc.poll() is None
    finally:
        for agent in cluster.started:
            agent.kill_all()
        store.kill_all()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_store_restarted_on_its_port_is_not_rejoined_every_agent_saves_and_exits(tmp_path):
    """What a deleted store pod does to its run (docs/operator.md, "No worker is special"): the
    agents' TCPStore client never reconnects, even once a new, empty store listens on the same
    port, so each agent stops its worker with SIGTERM (the trainer saves the step reached) and
    exits 1, which the operator retries. Were an agent to go on, a replacement would form a
    second group in the new store's empty rendezvous."""
    cluster = Cluster(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    port = cluster.endpoint.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "bloomrun.trainer.rendezvous_store", f"--port={port}"]
    stores = [Started(command, tmp_path / "store.log", dict(os.environ))]
    try:
        wait_until(lambda: "listening" in stores[0].text(), 60, "the store")
        agents = [cluster.agent("a", is_host=False), cluster.agent("b", is_host=False)]
        wait_until(lambda: cluster.starts() and newest_checkpoint_step(checkpoints) >= EVERY, 240, "two nodes training")
        stores[0].kill_all()
        stores.append(Started(command, tmp_path / "store-2.log", dict(os.environ)))
        wait_until(lambda: "listening" in stores[1].text(), 60, "the new store")
        wait_until(lambda: all(agent.proc.poll() is not None for agent in agents), 120, "both agents to exit")
        assert [agent.proc.returncode for agent in agents] == [1, 1]
        saved = [int(m) for agent in agents for m in re.findall(r"SIGTERM: checkpoint at step (\d+) saved", agent.text())]
        assert saved and max(saved) == newest_checkpoint_step(checkpoints) == cluster.last("step"), saved
        assert len(cluster.starts()) == 1, "no agent formed a new group"
    finally:
        for started in cluster.started + stores:
            started.kill_all()
