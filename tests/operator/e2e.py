"""Helpers for the operator's tests on the real control plane (tests/cluster).

The operator runs as a real subprocess (`python -m bloomrun.operator`) so tests can kill
and restart it. Each test gets its own namespace (Pod Security `restricted`, which the
worker pods must pass) and its own kwok GPU nodes, pinned with a node affinity, so tests
never compete with each other or with other suites for the shared pools.
"""

from __future__ import annotations

import copy
import sys
import urllib.request
import uuid
from pathlib import Path

from kubernetes import client

from bloomrun.operator.spec import GROUP, PLURAL, VERSION
from tests.cluster.processes import free_port
from tests.cluster.processes import wait_until as wait_for  # the suite's one polling helper

REPO = Path(__file__).resolve().parents[2]
TIMER_S = 1.0
CHECKPOINT_CLAIM = "checkpoints"

BASE_SPEC = {
    "model": {"preset": "tiny"},
    "data": {"sources": [{"path": "/data/tiny_text_document"}]},
    # 96 sequences of 1 split over 1-4 nodes of 8 GPUs, every size the tests' ranges allow.
    "training": {"trainSteps": 100, "globalBatchSize": 96, "microBatchSize": 1},
    "image": "ghcr.io/bloomrun/trainer:test",
    "gpusPerNode": 8,
    "restartPolicy": {"backoffSeconds": 1, "maxRestarts": 5},
}


def install_crds(cluster) -> None:
    """The repository's CRDs (BloomRun, BloomStudy, kopf's peerings), applied and Established."""
    names = ("bloomrun.io_bloomruns.yaml", "bloomrun.io_bloomstudies.yaml", "kopf.dev_peerings.yaml")
    for name in names:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds" / name))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/bloomruns.bloomrun.io",
                    "crd/bloomstudies.bloomrun.io", "crd/clusterkopfpeerings.kopf.dev")


class Operator:
    """`python -m bloomrun.operator` as a child of the test cluster (stopped with it at the
    latest), on free liveness and metrics ports: how the operator tests, the chart tests and
    bench/operator_scale.py all start it.

    It acts as the cluster admin unless `kubeconfig` gives another identity (the chart tests
    pass a ServiceAccount's token); `extra_args` come last, so they may override the rest.
    """

    def __init__(self, cluster, *extra_args: str, kubeconfig: str | None = None,
                 metrics_port: int | None = None, timer_interval: float | None = TIMER_S):
        self.cluster = cluster
        self.liveness_port, self.metrics_port = free_port(), metrics_port or free_port()
        argv = [sys.executable, "-m", "bloomrun.operator", "--liveness",
                f"http://127.0.0.1:{self.liveness_port}/healthz", "--metrics-port", str(self.metrics_port)]
        if timer_interval is not None:
            argv += ["--timer-interval", str(timer_interval)]
        env = cluster.env() | {"PYTHONPATH": str(REPO)} | ({"KUBECONFIG": kubeconfig} if kubeconfig else {})
        self.child = cluster.spawn(f"operator-{uuid.uuid4().hex[:4]}", [*argv, *extra_args], env=env)
        self.wait_live()

    def wait_live(self, timeout: float = 60) -> None:
        self.child.wait_http_ok(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout,
                                "the operator's liveness endpoint")

    def restart(self, kill: bool = False) -> None:
        self.child.stop(grace=0.1 if kill else 10)
        self.child.start()
        self.wait_live()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def log(self) -> str:
        return self.child.log.read_text(errors="replace")

    def stop(self) -> None:
        self.child.stop()


class Runs:
    """BloomRuns and their children in one test namespace, through the admin API. A wait
    that times out says the run's status and, given the `operator` serving it, its log."""

    def __init__(self, cluster, namespace: str, operator: Operator | None = None):
        self.cluster, self.namespace, self.operator = cluster, namespace, operator
        api = cluster.api()
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.nodes: list[str] = []

    # ------------------------------------------------------------------- nodes

    def add_nodes(self, count: int, pool: str = "a100-80gb") -> list[str]:
        names = [f"e2e-{uuid.uuid4().hex[:8]}" for _ in range(count)]
        for name in names:
            self.cluster.add_node(name, pool)
        self.nodes += names
        return names

    def cleanup(self) -> None:
        for name in self.nodes:
            try:
                self.core.delete_node(name)
            except client.ApiException:
                pass

    # -------------------------------------------------------------------- runs

    def checkpoint_claim(self) -> dict:
        """The namespace's checkpoint claim (created and Bound on first use): the nodes of a
        multi-node run share their checkpoints through one (spec.py refuses them without)."""
        try:
            self.core.read_namespaced_persistent_volume_claim(CHECKPOINT_CLAIM, self.namespace)
        except client.ApiException as err:
            if err.status != 404:
                raise
            self.cluster.create_pvc(self.namespace, CHECKPOINT_CLAIM)
        return {"claimName": CHECKPOINT_CLAIM}

    def manifest(self, name: str, nodes: list[str], min_nodes: int, max_nodes: int, **spec) -> dict:
        body = copy.deepcopy(BASE_SPEC) | {"nodes": {"min": min_nodes, "max": max_nodes}}
        if max_nodes > 1 and "checkpointVolume" not in spec:
            body["checkpointVolume"] = self.checkpoint_claim()
        body["pool"] = {
            "nodeSelector": {"bloomrun.io/pool": "a100-80gb"},
            # Only this test's nodes: the pools are shared with the rest of the suite.
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": nodes}]}]}}},
        }
        body.update(spec)
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "BloomRun",
                "metadata": {"name": name, "namespace": self.namespace}, "spec": body}

    def create(self, manifest: dict) -> dict:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, manifest,
                                                           field_validation="Strict")

    def get(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def patch_spec(self, name: str, spec: dict) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec})

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                    propagation_policy="Foreground")

    def status(self, name: str) -> dict:
        return self.get(name).get("status") or {}

    def wait_status(self, name: str, predicate, timeout: float = 30, what: str = "a status") -> dict:
        try:
            return wait_for(lambda: (lambda s: s if predicate(s) else None)(self.status(name)), timeout,
                            f"{self.namespace}/{name}: {what}")
        except TimeoutError as err:
            raise TimeoutError(f"{err}\nstatus: {self.status(name)}{self.operator_state()}") from None

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict:
        return self.wait_status(name, lambda s: s.get("phase") == phase, timeout, f"phase {phase}")

    def operator_state(self) -> str:
        if self.operator is None:
            return ""
        child = self.operator.child
        return f"\noperator {'running' if child.alive() else 'EXITED'}; its log's tail:\n{child.log_tail(40)}"

    # -------------------------------------------------------------------- pods

    def pods(self, name: str) -> list[client.V1Pod]:
        return self.core.list_namespaced_pod(self.namespace, label_selector=f"bloomrun.io/run={name}").items

    def live_pods(self, name: str) -> list[client.V1Pod]:
        return [p for p in self.pods(name) if p.metadata.deletion_timestamp is None
                and p.status.phase in ("Pending", "Running")]

    def running_pods(self, name: str) -> list[client.V1Pod]:
        return [p for p in self.live_pods(name) if p.status.phase == "Running"]

    def wait_running_pods(self, name: str, count: int, timeout: float = 30) -> list[client.V1Pod]:
        try:
            return wait_for(lambda: (lambda pods: pods if len(pods) == count else None)(self.running_pods(name)),
                            timeout, f"{count} running workers of {name}")
        except TimeoutError as err:
            raise TimeoutError(f"{err}\npods:\n{self.describe_pods(name)}{self.operator_state()}") from None

    def describe_pods(self, name: str) -> str:
        """A line per pod of the run: phase, node, and why it is not scheduled if it is not."""
        lines = []
        for pod in self.pods(name):
            scheduled = next((c for c in pod.status.conditions or [] if c.type == "PodScheduled"), None)
            why = f" {scheduled.reason}: {scheduled.message}" if scheduled and scheduled.status != "True" else ""
            gone = " (deleting)" if pod.metadata.deletion_timestamp else ""
            lines.append(f"  {pod.metadata.name} {pod.status.phase}{gone} on {pod.spec.node_name}{why}")
        return "\n".join(lines)

    def events(self, name: str) -> list[client.CoreV1Event]:
        return [e for e in self.core.list_namespaced_event(self.namespace).items
                if e.involved_object.name == name and e.involved_object.kind == "BloomRun"]
