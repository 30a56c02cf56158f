"""A BloomRun in real containers: the chart's operator (its own image, its own ServiceAccount)
runs examples/tiny-pods.yaml on the real nodes, two worker pods train through the run's
rendezvous store pod; pods outside the run dial its ports, then faults a pod shows are thrown
at it in turn: worker-0 deleted, a worker process SIGKILLed inside its container, rank 0
stopped, the store pod deleted (a re-rendezvous), a lost node; then the run must finish
Succeeded. Two more runs beside it fail their own ways: out of memory (retried) and a corrupt
data file (failed at once), and a last one trains a 2-stage pipeline across the two nodes. The
tests of this module share that one run and go in file order.
The module is named to run last among tests/pods: it loses and returns a real node of the
session's node set, and afterwards pods on the returned node failed to resolve names (the
cluster DNS path of tests/cluster/real_network.py; "Temporary failure in name resolution" in
test_cluster_network, seen once in the full suite, not yet diagnosed).

Steps lost are read from status.progress, which only the trainer writes: each trainer session
(a new startTime) reports the checkpoint step it resumed from, so a restart lost the steps
between the last step reported before it and that resumed step. World sizes are torchrun's
own rendezvous lines in the workers' logs. Timings go to the test log (`-s`) and
BENCHMARKS.md ("Real pods").
"""

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import transformers
import yaml
from kubernetes import client

from bloomrun.operator.desired import RDZV_PORT, SCRAPER_NAMESPACE_LABEL
from bloomrun.trainer.checkpoint_layout import list_checkpoints
from tests.chart.helm import CHART, render
from tests.pods.netprobe import DROPPED, SILENT, dial, probe_pod

# The first test also pays for importing the 7 GB trainer image into both nodes.
pytestmark = [pytest.mark.cluster, pytest.mark.pods, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny-pods.yaml"
RUN = "tiny"
RESUMED = re.compile(r"resumed from \S+: step (\d+)")  # the trainer's log line
# Rank 0's line at the start of every trainer session (bloomrun/trainer/trainer.py).
WORLD = re.compile(r"^(\S+ \S+) \[rank 0\] INFO bloomrun.trainer: model \S+: .*?; (\d+) ranks \(TP", re.M)
# Long enough for every fault below at ~10 steps/s; the last test shortens the run.
LONG_RUN_STEPS = 100_000
OOM_BACKOFF_S = 5


@dataclass
class Deployment:
    cluster: object
    namespace: str  # the run's; the operator has its own
    operator_namespace: str
    checkpoints: Path  # the checkpoint volume's folder on this machine
    data: Path  # the data volume's folder on this machine
    manifest: dict
    nodes: object  # the session's RealNodes
    timings: dict[str, float] = field(default_factory=dict)
    sessions: dict[str, dict] = field(default_factory=dict)
    """Trainer sessions seen in status.progress, by startTime: resumedStep and the last step."""

    def run(self, name: str = RUN) -> dict:
        return json.loads(self.cluster.kubectl("get", "bloomrun", name, "-n", self.namespace, "-o", "json").stdout)

    def status_of(self, name: str) -> dict:
        return self.run(name).get("status", {})

    def progress(self) -> dict:
        progress = self.run().get("status", {}).get("progress", {})
        if progress.get("startTime") and progress.get("step") is not None:
            seen = self.sessions.setdefault(progress["startTime"], {"resumed": progress.get("resumedStep", 0)})
            seen["last"] = max(seen.get("last", 0), progress["step"])
        return progress

    def wait_step_above(self, step: int, timeout: float, what: str) -> dict:
        return self.cluster.wait(lambda: self.not_failed() and (p := self.progress()).get("step", -1) > step and p,
                                 timeout, what)

    def not_failed(self) -> bool:
        """True while the run has not Failed; raises with its whole status once it has, so a
        wait for training again stops at once and says why."""
        status = self.run().get("status", {})
        if status.get("phase") == "Failed":
            raise AssertionError(f"the run Failed: {json.dumps(status, indent=1)}")
        return True

    def wait_training_on(self, workers: int, timeout: float, what: str) -> None:
        """Until the newest trainer session spans `workers` workers and has trained a step: a
        fault thrown earlier would meet a worker whose torchrun is still in its rendezvous
        (no training process to signal, or a group about to re-form anyway)."""
        self.cluster.wait(lambda: self.not_failed() and self.world_size() == workers, timeout, what)
        self.wait_step_above(self.progress()["step"], 120, f"{what}: a step")

    def wait_new_session(self, after: set[str], timeout: float, what: str) -> dict:
        """The progress of the first trainer session not in `after` that has trained a step."""
        return self.cluster.wait(lambda: self.not_failed() and (p := self.progress()).get("startTime") not in after
                                 and p.get("step", -1) > (p.get("resumedStep") or 0) and p, timeout, what)

    def workers(self, name: str = RUN) -> list[client.V1Pod]:
        core = client.CoreV1Api(self.cluster.api())
        return core.list_namespaced_pod(self.namespace, label_selector=f"bloomrun.io/run={name},"
                                        "app.kubernetes.io/component=worker").items

    def world_size(self) -> int | None:
        """The world of the newest trainer session, from rank 0's start line in the workers'
        logs (rank 0 is on whichever worker the rendezvous made it)."""
        found = sorted(match for pod in self.workers() for match in WORLD.findall(self.logs(pod.metadata.name)))
        return int(found[-1][1]) if found else None

    def rank_zero_pod(self) -> str:
        """The worker whose log has the newest trainer session's rank-0 start line."""
        starts = sorted((stamp, pod.metadata.name) for pod in self.workers()
                        for stamp, _size in WORLD.findall(self.logs(pod.metadata.name)))
        return starts[-1][1]

    def run_folder(self) -> Path:
        return self.checkpoints / self.namespace / RUN / self.run()["metadata"]["uid"]

    def newest_checkpoint(self) -> int:
        return max(step for step, _ in list_checkpoints(self.run_folder()))

    def logs(self, pod: str) -> str:
        return self.cluster.kubectl("logs", "-n", self.namespace, pod, check=False).stdout

    def record(self, name: str, seconds: float) -> None:
        self.timings[name] = seconds
        print(f"\n[real pods] {name}: {seconds:.1f} s", file=sys.stderr)


def lost_in(before: dict, after: dict) -> int:
    """Steps a restart lost: trained in the session `before` (up to its last reported step)
    and trained again by `after`, which resumed from an earlier checkpoint."""
    return max(0, before["last"] - after["resumed"])


def signal_trainer(deployment: "Deployment", pod: str, signal_name: str) -> None:
    """Sends `signal_name` to the training process in `pod` (torchrun's child, not torchrun,
    which is PID 1), from inside the container as the trainer's own user."""
    script = ("import os, signal\n"
              "for p in filter(str.isdigit, os.listdir('/proc')):\n"
              "    argv = open(f'/proc/{p}/cmdline', 'rb').read().split(b'\\0')\n"
              "    if int(p) not in (1, os.getpid()) and b'bloomrun.trainer.train' in argv"
              " and b'torchrun' not in b' '.join(argv):\n"
              f"        os.kill(int(p), signal.{signal_name}); print('signalled', p)\n")

    def signalled() -> bool:
        return "signalled" in deployment.cluster.kubectl("exec", "-n", deployment.namespace, pod, "-c", "trainer",
                                                         "--", "python", "-c", script).stdout
    # Between two trainer sessions (torchrun re-forming its group) there is none to signal.
    deployment.cluster.wait(signalled, 60, f"a training process in {pod} to signal")


def pod_monitor_targets(core: client.CoreV1Api, monitor: dict) -> list[dict]:
    """What Prometheus Operator's discovery finds for the chart's PodMonitor, as file_sd
    target groups: the Running pods its label selector matches in its namespaces, on the
    container port it names. (Debian's Prometheus 2.42 is built without kubernetes_sd, so
    the test does the discovery; the selection is the monitor's own.)"""
    spec = monitor["spec"]
    endpoint, = spec["podMetricsEndpoints"]
    selector = ",".join(f"{key}={value}" for key, value in spec["selector"]["matchLabels"].items())
    groups = []
    for namespace in spec["namespaceSelector"]["matchNames"]:
        for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
            if pod.status.phase != "Running" or not pod.status.pod_ip:
                continue
            ports = [port.container_port for container in pod.spec.containers for port in container.ports or []
                     if port.name == endpoint["port"]]
            groups += [{"targets": [f"{pod.status.pod_ip}:{port}"],
                        "labels": {"namespace": namespace, "pod": pod.metadata.name}} for port in ports]
    return groups


def host_claim(cluster, namespace: str, name: str, folder: Path, mode: str) -> None:
    """A claim bound to a hostPath volume on this machine's `folder` (both real nodes run
    here, so it is shared storage to them)."""
    core = client.CoreV1Api(cluster.api())
    volume = f"{namespace}-{name}"
    core.create_persistent_volume({
        "metadata": {"name": volume},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": [mode], "storageClassName": "",
                 "persistentVolumeReclaimPolicy": "Retain",
                 "hostPath": {"path": str(folder), "type": "Directory"},
                 "claimRef": {"namespace": namespace, "name": name}}})
    core.create_namespaced_persistent_volume_claim(namespace, {
        "metadata": {"name": name},
        "spec": {"accessModes": [mode], "storageClassName": "", "volumeName": volume,
                 "resources": {"requests": {"storage": "1Gi"}}}})
    cluster.wait(lambda: core.read_namespaced_persistent_volume_claim(name, namespace).status.phase == "Bound",
                 30, f"claim {name} bound")


def install_operator(cluster, nodes, images, namespace: str, watched: str) -> str:
    """`helm install` of the chart with the operator image built here, watching `watched`
    only (other tests' runs on this shared cluster are not its business)."""
    operator_ref, trainer_ref = images.ref("operator"), images.ref("trainer")
    values = {
        "image": dict(zip(("repository", "tag"), operator_ref.rsplit(":", 1)), pullPolicy="Never"),
        "trainerImage": dict(zip(("repository", "tag"), trainer_ref.rsplit(":", 1))),
        "watchNamespaces": [watched],
        "nodeSelector": nodes.selector, "tolerations": nodes.tolerations,
    }
    release = f"bloomrun-{namespace[-6:]}"
    values_file = cluster.layout.root / f"{release}-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    cluster.helm("install", release, str(CHART), "--namespace", namespace, "--values", str(values_file),
                 "--wait", "--timeout", "300s")
    return release


@pytest.fixture(scope="module")
def deployment(cluster, _real_nodes_session, _images_session):
    nodes, images = _real_nodes_session, _images_session
    began = time.monotonic()
    images.ref("trainer")  # imported into both nodes before the clock of the run starts
    images.ref("operator")
    for name, seconds in images.seconds.items():
        print(f"\n[real pods] import of the {name} image into 2 nodes: {seconds:.1f} s", file=sys.stderr)
    namespace = cluster.new_namespace("pods-run", pod_security="restricted")
    operator_namespace = cluster.new_namespace("pods-op", pod_security="restricted")
    install_began = time.monotonic()
    install_operator(cluster, nodes, images, operator_namespace, namespace)
    volumes = nodes.root / "volumes" / namespace
    data, checkpoints = volumes / "data", volumes / "checkpoints"
    shutil.copytree(REPO / "examples" / "data", data)
    checkpoints.mkdir()
    checkpoints.chmod(0o777)  # the trainer runs as uid 1000; a hostPath gets no fsGroup
    host_claim(cluster, namespace, "bloomrun-examples-data", data, "ReadOnlyMany")
    host_claim(cluster, namespace, "bloomrun-checkpoints", checkpoints, "ReadWriteMany")
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["metrics"]["logEvery"] = 10
    manifest["spec"]["training"]["trainSteps"] = LONG_RUN_STEPS
    manifest["spec"]["eval"]["everyCheckpoints"] = 50  # about one evaluation Job per 5 min here
    # A stopped rank is named after 30 s without a step here (default: 300 s, sized for NCCL).
    manifest["spec"]["watchdog"] = {"minTimeoutSeconds": 30, "phaseTimeoutSeconds": 600}
    found = Deployment(cluster, namespace, operator_namespace, checkpoints, data, manifest, nodes)
    found.record("helm install (operator Ready)", time.monotonic() - install_began)
    print(f"\n[real pods] set-up before the run: {time.monotonic() - began:.1f} s", file=sys.stderr)
    return found


def test_the_example_trains_in_real_pods(deployment):
    cluster = deployment.cluster
    applied = time.monotonic()
    cluster.kubectl("apply", "-n", deployment.namespace, "-f", "-", input=yaml.safe_dump(deployment.manifest))
    progress = deployment.wait_step_above(0, 600, "the first training step in status.progress")
    deployment.record("kubectl apply -> first step in status", time.monotonic() - applied)
    assert progress["loss"] > 0 and progress["targetSteps"] == deployment.manifest["spec"]["training"]["trainSteps"]
    workers = deployment.workers()
    assert sorted(p.metadata.name for p in workers) == [f"{RUN}-worker-0", f"{RUN}-worker-1"]
    assert len({p.spec.node_name for p in workers}) == 2, "one worker per real node"
    # Both workers in one world, through the store pod's rendezvous (with min 1, the first
    # may have started alone and been joined by the second: torchrun re-forms).
    cluster.wait(lambda: deployment.world_size() == 2, 300, "both workers training in one world")
    deployment.record("kubectl apply -> both workers in one world", time.monotonic() - applied)
    deployment.wait_step_above(deployment.progress()["step"], 120, "training in the world of 2")
    run = deployment.run()
    assert run["status"]["phase"] == "Running"
    assert run["status"]["nodes"]["ready"] == 2


def test_prometheus_scrapes_the_workers_as_the_charts_pod_monitor_would(deployment):
    cluster = deployment.cluster
    monitor, = [o for o in render({"podMonitor": {"enabled": True}, "watchNamespaces": [deployment.namespace]})
                if o["kind"] == "PodMonitor"]
    endpoint, = monitor["spec"]["podMetricsEndpoints"]
    targets = deployment.nodes.root / "pod-monitor-targets.json"
    targets.write_text(json.dumps(pod_monitor_targets(client.CoreV1Api(cluster.api()), monitor)))
    prometheus = cluster.start_prometheus([{
        "job_name": monitor["metadata"]["name"], "metrics_path": endpoint["path"],
        "honor_labels": endpoint["honorLabels"], "scrape_interval": "2s",
        "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "2s"}]}])
    up = f'up{{job="{monitor["metadata"]["name"]}"}} == 1'
    scraped = cluster.wait(lambda: len(found := prometheus.query(up)) == 2 and found, 120, "both workers scraped")
    assert {s["metric"]["pod"] for s in scraped} == {f"{RUN}-worker-0", f"{RUN}-worker-1"}, scraped
    query = f'bloomrun_train_step{{namespace="{deployment.namespace}", run="{RUN}"}}'
    series = cluster.wait(lambda: prometheus.query(query), 60, "the trainer's step series")
    assert all(float(s["value"][1]) > 0 for s in series), series
    loss = prometheus.query(f'bloomrun_train_loss{{namespace="{deployment.namespace}"}}')
    assert loss and all(float(s["value"][1]) > 0 for s in loss)


def test_no_pod_outside_the_run_reaches_its_store_or_workers_while_it_trains(deployment, netprobe):
    """Issue 20 beside a training run: the operator's NetworkPolicy keeps a pod of another
    namespace, and a pod of the run's own namespace that is not the run's, off the store's
    port and the workers' ports (dropped), while a scraper namespace reaches the metrics port;
    the run's own pods keep training through the store. Each probe dials the run's pods on its
    own node: from a probe on the other node the scraper's allowed dial failed too ("no route
    to host", not yet explained), so such a dial would prove nothing about the policy."""
    cluster = deployment.cluster
    core = client.CoreV1Api(cluster.api())
    outsider = cluster.new_namespace("pods-outsider", pod_security="restricted")
    scrapers = cluster.new_namespace("pods-scraper", pod_security="restricted")
    core.patch_namespace(scrapers, {"metadata": {"labels": {SCRAPER_NAMESPACE_LABEL: "true"}}})
    roles = {"outsider": outsider, "neighbour": deployment.namespace, "scraper": scrapers}
    probes = {(role, node): f"{role}-{index}" for role in roles for index, node in enumerate(deployment.nodes.names)}
    for (role, node), name in probes.items():
        core.create_namespaced_pod(roles[role], probe_pod(name, {"app": role}, node, deployment.nodes, [8080]))
    for (role, _), name in probes.items():
        cluster.wait_for_pod(roles[role], name, lambda p: p.status.phase == "Running", 90, "Running")

    def running(selector: str) -> list[client.V1Pod]:
        pods = core.list_namespaced_pod(deployment.namespace, label_selector=selector).items
        return [p for p in pods if p.status.phase == "Running" and p.status.pod_ip and not p.metadata.deletion_timestamp]
    # Both workers Running: a Failed pod still shows the address it no longer holds. Run before
    # the faults: after them a Running worker's address twice answered no ARP on its own node
    # for a minute ("no route to host", not yet explained; BENCHMARKS.md).
    workers = cluster.wait(lambda: len(found := running(f"bloomrun.io/run={RUN},app.kubernetes.io/component=worker"))
                           == 2 and found, 300, "both workers Running")
    store, = running("app.kubernetes.io/component=rendezvous-store")
    where = ", ".join(f"{p.metadata.name} {p.status.pod_ip} on {p.spec.node_name}" for p in [store, *workers])
    metrics = deployment.manifest["spec"]["metrics"]["port"]
    at = deployment.progress()["step"]
    replies: dict[tuple, str] = {}

    def reply(role: str, target: client.V1Pod, port: int) -> str:
        name = probes[(role, target.spec.node_name)]
        replies[(name, target.metadata.name, port)] = found = dial(cluster, roles[role], name,
                                                                     f"{target.status.pod_ip}:{port}")
        return found

    # The scraper first: its connection to each worker's metrics port shows the address is live,
    # once the policy enforcer knows the new pods (until then the scraper too is refused).
    for worker in workers:
        try:
            cluster.wait(lambda w=worker: reply("scraper", w, metrics) == SILENT, 60,
                         f"the scraper connected to {worker.metadata.name}'s metrics port")
        except TimeoutError as err:
            raise AssertionError(f"{err}: {replies}; pods: {where}") from None
        assert reply("scraper", worker, RDZV_PORT) == DROPPED, (replies, where)
    for role in ("outsider", "neighbour"):
        for target, port in [(store, RDZV_PORT)] + [(w, port) for w in workers for port in (RDZV_PORT, metrics)]:
            assert reply(role, target, port) == DROPPED, (replies, where)
    deployment.wait_step_above(at + 10, 120, "training to go on through the store")
    for (role, _), name in probes.items():
        core.delete_namespaced_pod(name, roles[role], grace_period_seconds=0)


def test_a_deleted_worker_saves_its_step_and_its_replacement_resumes_there(deployment):
    """worker-0 on purpose: where Kubeflow's PyTorchJob points c10d (its agent hosts the
    store, so losing it ends the job); here the store is a pod of its own (issue 19)."""
    cluster = deployment.cluster
    before = deployment.progress()
    session = deployment.sessions[before["startTime"]]
    victim = f"{RUN}-worker-0"
    old_uid = client.CoreV1Api(cluster.api()).read_namespaced_pod(victim, deployment.namespace).metadata.uid
    deleted = time.monotonic()
    cluster.kubectl("delete", "pod", victim, "-n", deployment.namespace, "--wait=true", "--timeout=300s")
    deployment.record("kubectl delete pod (SIGTERM) -> pod gone", time.monotonic() - deleted)
    saved = deployment.newest_checkpoint()
    assert saved >= session["last"], "the SIGTERM checkpoint is at the step the run had reached"
    after = deployment.wait_new_session(set(deployment.sessions), 300, "training after the deletion")
    deployment.record("pod deleted -> stepping again", time.monotonic() - deleted)
    assert after["resumedStep"] == saved
    assert lost_in(session, deployment.sessions[after["startTime"]]) == 0

    def replaced():
        pods = {p.metadata.name: p for p in deployment.workers()}
        pod = pods.get(victim)
        return pod is not None and pod.metadata.uid != old_uid and pod.status.phase == "Running" and pod
    cluster.wait(replaced, 300, "the replacement worker Running")
    # Rank 0 (on whichever worker the rendezvous put it) says where the group resumed.
    resumed = [int(step) for pod in deployment.workers() for step in RESUMED.findall(deployment.logs(pod.metadata.name))]
    assert saved in resumed, f"the group resumed at {resumed}, not at the saved step {saved}"


def test_a_worker_process_killed_in_its_container_is_restarted_by_torchrun(deployment):
    cluster = deployment.cluster
    pod = f"{RUN}-worker-0"
    core = client.CoreV1Api(cluster.api())
    deployment.wait_training_on(2, 300, "both workers training before the SIGKILL")
    uid = core.read_namespaced_pod(pod, deployment.namespace).metadata.uid
    before = deployment.progress()
    # SIGKILL the training process (torchrun's child), not torchrun (PID 1): what a crash
    # or the kernel's OOM killer does to one worker.
    signal_trainer(deployment, pod, "SIGKILL")
    killed = time.monotonic()
    after = deployment.wait_new_session(set(deployment.sessions), 300, "training after the SIGKILL")
    deployment.record("worker process SIGKILLed -> stepping again", time.monotonic() - killed)
    pod_after = core.read_namespaced_pod(pod, deployment.namespace)
    assert pod_after.metadata.uid == uid and pod_after.status.container_statuses[0].restart_count == 0, (
        "torchrun restarted the worker inside the pod; the pod was not replaced")
    lost = lost_in(deployment.sessions[before["startTime"]], deployment.sessions[after["startTime"]])
    print(f"\n[real pods] steps lost to the SIGKILL: {lost} (resumed at {after['resumedStep']}, "
          f"step {before['step']} reported before)", file=sys.stderr)
    # Back to the newest checkpoint at worst: everySteps bounds the loss.
    assert lost <= deployment.manifest["spec"]["checkpoint"]["everySteps"]


def test_a_stopped_rank_is_named_hung_by_the_watchdog_and_its_pod_replaced(deployment):
    """SIGSTOP freezes rank 0's training process: no exit, no error, its peer waits in a
    collective. The watchdog beside it (issue 17) names the rank, writes `hung: ...` as the
    container's termination message and ends torchrun; the operator counts the failure as
    Hung and replaces the pod, and the run trains on from the newest checkpoint. Rank 0 on
    purpose: the group's store is in its process, and a watchdog that asked that store froze
    with it (watchdog.Peers), so this test failed whenever the rendezvous had put rank 0 on
    the pod it stopped."""
    cluster = deployment.cluster
    deployment.wait_training_on(2, 300, "both workers training before the SIGSTOP")
    pod = deployment.rank_zero_pod()
    core = client.CoreV1Api(cluster.api())
    uid = core.read_namespaced_pod(pod, deployment.namespace).metadata.uid
    before = deployment.progress()
    signal_trainer(deployment, pod, "SIGSTOP")
    stopped = time.monotonic()
    try:
        status = cluster.wait(lambda: (s := deployment.run()["status"]).get("restartsByReason", {}).get("Hung")
                              and s, 240, "the hang counted as a Hung restart")
    except TimeoutError as err:
        raise AssertionError(f"{err}\nstatus: {deployment.run()['status']}\n"
                             + "".join(f"\n--- {p.metadata.name} log tail:\n{deployment.logs(p.metadata.name)[-4000:]}"
                                       for p in deployment.workers())) from None
    deployment.record("rank SIGSTOPped -> pod failed as Hung", time.monotonic() - stopped)
    assert status["lastFailure"]["reason"] == "Hung", status["lastFailure"]
    assert re.search(r"hung: rank \d+ \(pid \d+\) on node \S+ made no progress", status["lastFailure"]["message"]), (
        status["lastFailure"])
    after = deployment.wait_new_session(set(deployment.sessions), 300, "training after the hang")
    deployment.record("rank SIGSTOPped -> stepping again", time.monotonic() - stopped)
    # The group trains on at min nodes meanwhile; the replacement comes after its backoff.
    cluster.wait(lambda: any(p.metadata.name == pod and p.metadata.uid != uid and p.status.phase == "Running"
                             for p in deployment.workers()), 300, "the hung pod replaced")
    lost = lost_in(deployment.sessions[before["startTime"]], deployment.sessions[after["startTime"]])
    print(f"\n[real pods] steps lost to the hang: {lost}", file=sys.stderr)
    # Steps trained while the peer waited were not trained: only a checkpoint interval at most.
    assert lost <= deployment.manifest["spec"]["checkpoint"]["everySteps"]


def test_deleting_the_rendezvous_store_pod_costs_one_re_rendezvous_and_no_steps(deployment):
    """The store pod deleted: its Deployment recreates it, but empty, and torch's TCPStore
    client never reconnects (tests/cli/test_elastic_scale.py pins both), so every agent loses
    its rendezvous: it stops its worker with SIGTERM, which saves the step reached, and exits 1.
    The operator counts one retryable restart per worker and replaces them; the new group forms
    through the new store and resumes at that step. (This test once passed on "20 steps further"
    alone, trained before the agents noticed, and the next test found a worker missing.)"""
    cluster = deployment.cluster
    core = client.CoreV1Api(cluster.api())
    selector = "app.kubernetes.io/component=rendezvous-store"
    store = core.list_namespaced_pod(deployment.namespace, label_selector=selector).items
    assert len(store) == 1
    before = deployment.progress()
    restarts = deployment.run()["status"].get("restartsByReason", {}).get("RetryableExitCode", 0)
    deleted = time.monotonic()
    cluster.kubectl("delete", "pod", store[0].metadata.name, "-n", deployment.namespace, "--wait=true")
    cluster.wait(lambda: any(p.status.phase == "Running" and p.metadata.uid != store[0].metadata.uid
                             for p in core.list_namespaced_pod(deployment.namespace, label_selector=selector).items),
                 120, "a new store pod")
    after = deployment.wait_new_session(set(deployment.sessions), 600, "training again through the new store")
    deployment.record("store pod deleted -> stepping again", time.monotonic() - deleted)
    deployment.wait_training_on(2, 600, "2 workers training again")
    deployment.record("store pod deleted -> training again on 2 nodes", time.monotonic() - deleted)
    status = deployment.run()["status"]
    assert status["restartsByReason"].get("RetryableExitCode", 0) > restarts, status
    lost = lost_in(deployment.sessions[before["startTime"]], deployment.sessions[after["startTime"]])
    print(f"\n[real pods] steps lost to the store's loss: {lost}", file=sys.stderr)
    assert lost == 0, deployment.sessions  # each worker saved at SIGTERM


def test_a_lost_node_leaves_the_run_training_and_it_scales_back_when_the_node_returns(deployment):
    """The machine of a worker goes away at once (kubelet, containerd and containers: no
    SIGTERM checkpoint). The other worker's torchrun re-forms at min nodes (1) from the newest
    checkpoint; when the machine returns, its kubelet reports the pod's container gone, the
    operator replaces the pod and the run scales back to 2. The machine lost is not the
    operator's (one replica here: losing it stops every reconcile until its pod is evicted);
    it may be the rendezvous store's, which is then evicted after STORE_EVICTION_S."""
    cluster, nodes = deployment.cluster, deployment.nodes
    core = client.CoreV1Api(cluster.api())
    operator_node, = {p.spec.node_name for p in core.list_namespaced_pod(deployment.operator_namespace).items}
    deployment.wait_training_on(2, 300, "both workers training before a node is lost")
    running = cluster.wait(lambda: len(found := [p for p in deployment.workers() if p.status.phase == "Running"
                                                 and not p.metadata.deletion_timestamp]) == 2 and found,
                           300, "both workers Running before a node is lost")
    victim, = [p for p in running if p.spec.node_name != operator_node]
    before = deployment.progress()
    nodes.lose_node(victim.spec.node_name)
    lost_at = time.monotonic()
    after = deployment.wait_new_session(set(deployment.sessions), 600, "the survivor training alone")
    deployment.record("node lost -> training again on 1 node", time.monotonic() - lost_at)
    assert deployment.world_size() == 1
    lost = lost_in(deployment.sessions[before["startTime"]], deployment.sessions[after["startTime"]])
    print(f"\n[real pods] steps lost to the lost node: {lost}", file=sys.stderr)
    assert lost <= deployment.manifest["spec"]["checkpoint"]["everySteps"]

    def not_ready():
        conditions = core.read_node(victim.spec.node_name).status.conditions or []
        return any(c.type == "Ready" and c.status != "True" for c in conditions)
    cluster.wait(not_ready, 180, "the lost node NotReady")
    nodes.return_node(victim.spec.node_name)
    returned = time.monotonic()
    deployment.wait_training_on(2, 600, "2 workers training again")
    deployment.record("node back -> training again on 2 nodes", time.monotonic() - returned)


def test_a_shortened_run_restarts_from_its_checkpoint_and_finishes_succeeded(deployment):
    """trainSteps lowered while the run trains: the workers are recreated for the new spec
    (each saves its step on SIGTERM), resume there and stop at the new target; the final
    checkpoint is scored by an evaluation Job and exports to a model transformers loads."""
    cluster = deployment.cluster
    target = deployment.progress()["step"] + 300
    deployment.manifest["spec"]["training"]["trainSteps"] = target
    cluster.kubectl("patch", "bloomrun", RUN, "-n", deployment.namespace, "--type", "merge",
                    "-p", json.dumps({"spec": {"training": {"trainSteps": target}}}))
    patched = time.monotonic()
    run = cluster.wait(lambda: (r := deployment.run()).get("status", {}).get("phase") in ("Succeeded", "Failed") and r,
                       900, "the run to finish")
    deployment.record("trainSteps lowered -> Succeeded", time.monotonic() - patched)
    assert run["status"]["phase"] == "Succeeded", json.dumps(run["status"], indent=1)
    assert run["status"]["progress"]["step"] == target
    assert deployment.newest_checkpoint() == target
    print(f"\n[real pods] trainer sessions: {deployment.sessions}; restarts "
          f"{run['status'].get('restarts')} {run['status'].get('restartsByReason')}", file=sys.stderr)
    # The final checkpoint is scored by an evaluation Job in the trainer's image (issue 13):
    # lm-eval in a real container, its summary back through the termination message.
    finished = time.monotonic()
    tasks = set(deployment.manifest["spec"]["eval"]["tasks"])
    scored = cluster.wait(lambda: (e := deployment.run()["status"].get("evaluation") or {}).get("step") == target
                          and e, 600, "the final checkpoint scored by its evaluation Job")
    deployment.record("run Succeeded -> final checkpoint scored", time.monotonic() - finished)
    assert set(scored["tasks"]) == tasks and all(0 <= v <= 1 for v in scored["tasks"].values()), scored
    assert scored["failed"] == 0 and scored["meanStderr"] > 0, scored

    # `bloomctl export` of the final checkpoint, as a user would, loads in transformers.
    final = next(path for step, path in list_checkpoints(deployment.run_folder()) if step == target)
    export = deployment.nodes.root / "export"
    manifest = deployment.nodes.root / "tiny-pods.yaml"
    manifest.write_text(yaml.safe_dump(deployment.manifest))
    done = subprocess.run([str(Path(sys.executable).parent / "bloomctl"), "export", str(final),
                           "--output", str(export), "--config", str(manifest)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    assert model.config.model_type == "bloom" and model.config.n_layer == 2


def test_a_worker_over_its_memory_limit_is_retried_with_backoff_up_to_max_restarts(deployment):
    """A transient failure (issue 19), the kernel's OOM killer in the container's memory
    cgroup: containerd reports the container OOMKilled (whichever process the kernel chose:
    torchrun then exits 1 after its restarts), the operator counts the restart under that
    reason, replaces the worker after the backoff, and fails the run once maxRestarts is spent."""
    cluster = deployment.cluster
    manifest = yaml.safe_load(yaml.safe_dump(deployment.manifest))
    manifest["metadata"]["name"] = "oom"
    manifest["spec"]["nodes"] = {"min": 1, "max": 1}
    manifest["spec"]["pool"].pop("affinity")  # it keeps tiny's workers apart, not this run's
    manifest["spec"]["resources"] = {"requests": {"cpu": "100m", "memory": "300Mi"},
                                     "limits": {"memory": "300Mi"}}  # torch alone needs more
    manifest["spec"]["restartPolicy"] = {"maxRestarts": 1, "backoffSeconds": OOM_BACKOFF_S}
    cluster.kubectl("apply", "-n", deployment.namespace, "-f", "-", input=yaml.safe_dump(manifest))
    began = time.monotonic()
    first = cluster.wait(lambda: (s := deployment.status_of("oom")).get("restarts") == 1 and s, 600,
                         "the first restart counted")
    deployment.record("memory limit too small -> restart counted OOMKilled", time.monotonic() - began)
    assert first["lastFailure"]["reason"] == "OOMKilled", first["lastFailure"]
    replacement = cluster.wait(lambda: next((p for p in deployment.workers("oom")
                                             if p.metadata.uid != first["lastFailure"]["podUid"]), None),
                               120, "the replacement worker")
    failed_at = datetime.fromisoformat(first["lastFailure"]["time"])
    waited = (replacement.metadata.creation_timestamp - failed_at).total_seconds()
    assert waited >= OOM_BACKOFF_S - 1, f"replaced {waited:.0f} s after the failure (whole-second stamps)"
    status = cluster.wait(lambda: (s := deployment.status_of("oom")).get("phase") == "Failed" and s, 600,
                          "the run Failed once its restarts were spent")
    deployment.record("OOMKilled twice, maxRestarts 1 -> Failed", time.monotonic() - began)
    assert status["restarts"] == 2 and status["restartsByReason"].get("OOMKilled", 0) >= 1, status
    assert next(c for c in status["conditions"] if c["type"] == "Failed")["reason"] == "RestartLimitExceeded"
    cluster.kubectl("delete", "bloomrun", "oom", "-n", deployment.namespace, "--wait=true")


def test_a_bad_data_file_fails_the_run_at_once_with_its_reason(deployment):
    """A permanent failure (issue 19): the trainer refuses a data file that is not one; the
    reason survives torchrun (the container's termination message) and the run fails on
    that one pod, without a retry, saying why in status.lastFailure."""
    cluster = deployment.cluster
    (deployment.data / "corrupt_text_document.idx").write_bytes(b"not an index file" * 8)
    (deployment.data / "corrupt_text_document.bin").write_bytes(bytes(256))
    manifest = yaml.safe_load(yaml.safe_dump(deployment.manifest))
    manifest["metadata"]["name"] = "corrupt"
    manifest["spec"]["nodes"] = {"min": 1, "max": 1}
    manifest["spec"]["pool"].pop("affinity")  # it keeps tiny's workers apart, not this run's
    manifest["spec"]["data"]["sources"] = [{"name": "corrupt", "path": "corrupt_text_document"}]
    manifest["spec"].pop("eval")
    manifest["spec"]["restartPolicy"] = {"maxRestarts": 5, "backoffSeconds": 1}
    applied = time.monotonic()
    cluster.kubectl("apply", "-n", deployment.namespace, "-f", "-", input=yaml.safe_dump(manifest))
    failed = cluster.wait(lambda: (s := deployment.status_of("corrupt")).get("phase") == "Failed" and s, 300,
                          "the run Failed")
    deployment.record("corrupt data file: apply -> Failed", time.monotonic() - applied)
    failure = failed["lastFailure"]
    assert failure["reason"] == "PermanentExitCode" and failed["restarts"] == 0, failed
    assert "/data/corrupt_text_document.idx: bad magic" in failure["message"], failure
    assert [p.metadata.uid for p in deployment.workers("corrupt")] in ([failure["podUid"]], []), "no replacement"
    cluster.kubectl("delete", "bloomrun", "corrupt", "-n", deployment.namespace, "--wait=true")


def test_a_pipeline_trains_across_the_two_nodes_and_is_scored(deployment):
    """Pipeline parallelism in real pods (issue 15): tiny cut into 2 stages, one per node
    (one rank per CPU worker), the activations between them over the pods' network; the run
    finishes Succeeded with the stages' sharded checkpoint, which its evaluation Job reads."""
    cluster = deployment.cluster
    manifest = yaml.safe_load(yaml.safe_dump(deployment.manifest))
    manifest["metadata"]["name"] = "pipeline"
    manifest["spec"]["nodes"] = {"min": 2, "max": 2}
    manifest["spec"]["parallel"] = {"pipeline": 2}  # tiny: 2 layers + embedding + head = 4 slots
    manifest["spec"]["training"]["trainSteps"] = 40
    manifest["spec"]["checkpoint"]["everySteps"] = 20
    anti = manifest["spec"]["pool"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    anti[0]["labelSelector"]["matchLabels"]["bloomrun.io/run"] = "pipeline"  # a stage per node
    applied = time.monotonic()
    cluster.kubectl("apply", "-n", deployment.namespace, "-f", "-", input=yaml.safe_dump(manifest))
    running = cluster.wait(lambda: (s := deployment.status_of("pipeline")).get("layout", {}).get("display") == "1x2x1"
                           and s, 300, "both stages running")
    assert {p.spec.node_name for p in deployment.workers("pipeline")} == set(deployment.nodes.names), running
    status = cluster.wait(lambda: (s := deployment.status_of("pipeline")).get("phase") in ("Succeeded", "Failed")
                          and s, 900, "the pipeline run to finish")
    deployment.record("pipeline run (P=2 over 2 nodes, 40 steps): apply -> Succeeded", time.monotonic() - applied)
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["step"] == 40, status
    run = deployment.run("pipeline")
    folder = deployment.checkpoints / deployment.namespace / "pipeline" / run["metadata"]["uid"]
    final = dict(list_checkpoints(folder))[40]
    assert (final / "index.json").exists() and not (final / "model.safetensors").exists()  # each stage wrote its own
    scored = cluster.wait(lambda: (e := deployment.status_of("pipeline").get("evaluation") or {}).get("step") == 40
                          and e, 600, "the pipeline's final checkpoint scored")
    assert scored["failed"] == 0 and set(scored["tasks"]) == set(manifest["spec"]["eval"]["tasks"]), scored
    cluster.kubectl("delete", "bloomrun", "pipeline", "-n", deployment.namespace, "--wait=true")
