"""The levers tests pull on a running cluster: nodes come, go and fail; pods end as a
kubelet would end them; volumes appear. Mixed into Cluster, which provides `_core` (an
admin CoreV1Api) and `wait`."""

import time

from tests.cluster import pods
from tests.cluster.nodes import KWOK_ANNOTATION, POOLS, node_manifest, schedulable

STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"


class Levers:
    # -- nodes -----------------------------------------------------------------------------

    def add_node(self, name: str, pool: str, wait: bool = True) -> None:
        """Adds a kwok node to `pool` (a100-80gb, a100-40gb or cpu)."""
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; pools are {', '.join(POOLS)}")
        self._core.create_node(node_manifest(name, POOLS[pool]))
        if wait:
            self.wait(lambda: schedulable(self._core.read_node(name)), 30, f"node {name} Ready")

    def delete_node(self, name: str) -> None:
        """Deletes the Node object, as when a machine is removed; its pods are then
        garbage-collected by the controller-manager's pod GC (after about 40 s)."""
        self._core.delete_node(name)

    def set_node_ready(self, name: str, ready: bool) -> None:
        """Makes a node NotReady (as when its kubelet stops reporting) or Ready again.

        NotReady: the node's kwok annotation goes (no re-initialisation) and the Ready
        condition turns False; the node lifecycle controller then taints it. Ready: kwok takes
        over again. kwok v0.8.0 still renews the node's lease and still removes its pods once
        deleted, where a real kubelet that is gone would confirm nothing: a test that needs
        that uses a node kwok never managed and plays its kubelet itself
        (tests/operator/test_operator_e2e.py, the stuck Terminating worker).
        """
        if ready:
            self._core.patch_node(name, {"metadata": {"annotations": {KWOK_ANNOTATION: "fake"}}},
                                  _content_type=MERGE)
            self._patch_ready(name, "True", "KubeletReady", "kubelet is posting ready status")
            return
        self._core.patch_node(name, {"metadata": {"annotations": {KWOK_ANNOTATION: None}}},
                              _content_type=MERGE)
        time.sleep(0.5)  # let kwok drop the node before the status changes under it
        self._patch_ready(name, "False", "KubeletNotReady", "container runtime is down")

    def _patch_ready(self, name: str, status: str, reason: str, message: str) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        condition = {"type": "Ready", "status": status, "reason": reason, "message": message,
                     "lastHeartbeatTime": now, "lastTransitionTime": now}
        self._core.patch_node_status(name, {"status": {"conditions": [condition]}},
                                     _content_type=STRATEGIC)

    # -- pods ------------------------------------------------------------------------------

    def fail_pod(self, namespace: str, name: str, exit_code: int | None = None,
                 reason: str | None = None, message: str | None = None) -> None:
        """Ends a pod as Failed the way a kubelet reports it: containers terminated with
        `exit_code` (default 1; 137 for OOMKilled and Evicted), `reason` ("OOMKilled",
        "Error", ...) and termination `message`, or evicted (`reason="Evicted"`). kwok leaves it so."""
        pod = self._core.read_namespaced_pod(name, namespace).to_dict(serialize=True)
        status = pods.failed_status(pod, exit_code, reason, message)
        self._core.patch_namespaced_pod_status(name, namespace, {"status": status},
                                               _content_type=STRATEGIC)

    def succeed_pod(self, namespace: str, name: str, message: str | None = None) -> None:
        """Ends a pod as Succeeded: every container exited 0 (leaving termination `message`)."""
        pod = self._core.read_namespaced_pod(name, namespace).to_dict(serialize=True)
        self._core.patch_namespaced_pod_status(name, namespace,
                                               {"status": pods.succeeded_status(pod, message)},
                                               _content_type=STRATEGIC)

    def wait_for_pod(self, namespace: str, name: str, predicate, timeout: float = 30,
                     what: str = "a condition"):
        """Polls the pod until predicate(pod) holds (pod as V1Pod); returns the pod."""
        def check():
            pod = self._core.read_namespaced_pod(name, namespace)
            return pod if predicate(pod) else None
        return self.wait(check, timeout, f"pod {namespace}/{name}: {what}")

    # -- volumes ---------------------------------------------------------------------------

    def create_pvc(self, namespace: str, name: str, size: str = "10Gi",
                   access_mode: str = "ReadWriteMany") -> None:
        """Creates a PersistentVolumeClaim and a hostPath PersistentVolume reserved for it,
        and waits until the PV controller binds them (there is no dynamic provisioner)."""
        volume = f"pv-{namespace}-{name}"
        self._core.create_persistent_volume({
            "metadata": {"name": volume},
            "spec": {"capacity": {"storage": size}, "accessModes": [access_mode],
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                     "hostPath": {"path": f"/tmp/{volume}"},
                     "claimRef": {"namespace": namespace, "name": name}}})
        self._core.create_namespaced_persistent_volume_claim(namespace, {
            "metadata": {"name": name},
            "spec": {"accessModes": [access_mode], "storageClassName": "",
                     "volumeName": volume, "resources": {"requests": {"storage": size}}}})
        self.wait(lambda: self._core.read_namespaced_persistent_volume_claim(
            name, namespace).status.phase == "Bound", 30, f"PVC {namespace}/{name} Bound")
