"""Real containers on real kubelet nodes (tests/cluster/real_nodes.py): what kwok only
writes into pod statuses, a kubelet and containerd do here. The probe image is a static
binary built here (tools/k8s/node/probe) and imported into the nodes' containerd."""

import time
from pathlib import Path

import pytest
from kubernetes import client

from tests.cluster.host_state import HostState, foreign_nodes_running
from tests.cluster.real_nodes import PROBE_IMAGE, RealNodes

pytestmark = [pytest.mark.cluster, pytest.mark.pods]


def probe_pod(name: str, nodes, args: list[str], node_name: str | None = None,
              grace: int = 30, out: Path | None = None) -> dict:
    """A pod running the probe with `args` on a real node; `out`, if given, is mounted at
    /out (a hostPath, so the test reads what the container wrote after it is gone)."""
    container = {"name": "probe", "image": PROBE_IMAGE, "imagePullPolicy": "Never",
                 "args": args}
    spec = {"restartPolicy": "Never", "nodeSelector": nodes.selector,
            "tolerations": nodes.tolerations, "terminationGracePeriodSeconds": grace,
            "containers": [container]}
    if node_name:
        spec["nodeName"] = node_name
    if out is not None:
        out.mkdir(exist_ok=True)
        out.chmod(0o777)
        spec["volumes"] = [{"name": "out", "hostPath": {"path": str(out), "type": "Directory"}}]
        container["volumeMounts"] = [{"name": "out", "mountPath": "/out"}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
def core(cluster):
    return client.CoreV1Api(cluster.api())


@pytest.fixture
def namespace(cluster):
    # hostPath volumes need the privileged Pod Security level (no label: the default).
    return cluster.new_namespace("pods", pod_security=None)


def _phase(cluster, namespace, name, phases, timeout=60):
    return cluster.wait_for_pod(namespace, name, lambda p: p.status.phase in phases,
                                timeout, f"phase in {phases}")


def test_a_pod_runs_on_each_real_node_and_its_logs_come_back(cluster, core, namespace,
                                                              real_nodes):
    for i, node in enumerate(real_nodes.names):
        core.create_namespaced_pod(namespace, probe_pod(
            f"hello-{i}", real_nodes, ["print", f"hello from pod {i}"], node_name=node))
    for i, node in enumerate(real_nodes.names):
        pod = _phase(cluster, namespace, f"hello-{i}", {"Running"})
        assert pod.spec.node_name == node
        assert pod.status.pod_ip.startswith("10.88.")
        logs = cluster.wait(lambda: cluster.kubectl("logs", "-n", namespace, f"hello-{i}").stdout,
                            30, "logs")
        assert f"hello from pod {i}" in logs and "probe: printed to stdout" in logs
    ips = {core.read_namespaced_pod(f"hello-{i}", namespace).status.pod_ip for i in range(2)}
    assert len(ips) == 2  # each node hands out addresses from its own subnet


def test_exit_code_comes_back_in_the_pod_status(cluster, core, namespace, real_nodes):
    core.create_namespaced_pod(namespace, probe_pod("exits", real_nodes, ["exit", "3"]))
    pod = _phase(cluster, namespace, "exits", {"Failed", "Succeeded"})
    assert pod.status.phase == "Failed"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    assert "exiting with 3" in cluster.kubectl("logs", "-n", namespace, "exits").stdout


def test_delete_sends_sigterm_and_waits_for_the_container_to_finish(cluster, core, namespace,
                                                                    real_nodes, tmp_path):
    out = tmp_path / "term"
    core.create_namespaced_pod(namespace, probe_pod(
        "graceful", real_nodes, ["term", "/out/signals", "2"], grace=30, out=out))
    _phase(cluster, namespace, "graceful", {"Running"})
    began = time.monotonic()
    cluster.kubectl("delete", "pod", "-n", namespace, "graceful", "--wait=true", "--timeout=60s")
    took = time.monotonic() - began
    lines = (out / "signals").read_text().splitlines()
    assert lines[0].startswith("SIGTERM") and lines[1] == "done"  # it finished its work
    assert 2 <= took < 30  # waited for the 2 s of work, not for the whole grace period


def test_a_container_ignoring_sigterm_is_killed_at_the_end_of_the_grace_period(
        cluster, core, namespace, real_nodes, tmp_path):
    out = tmp_path / "ignore"
    core.create_namespaced_pod(namespace, probe_pod(
        "stubborn", real_nodes, ["ignore", "/out/signals"], grace=4, out=out))
    _phase(cluster, namespace, "stubborn", {"Running"})
    began = time.monotonic()
    cluster.kubectl("delete", "pod", "-n", namespace, "stubborn", "--wait=true", "--timeout=60s")
    took = time.monotonic() - began
    assert (out / "signals").read_text().splitlines() == ["ignored SIGTERM"]
    assert 4 <= took < 20


def test_nodes_put_the_host_back_even_when_the_test_fails(cluster, real_nodes):
    """A node set of its own, started beside the session's and failed on purpose: after
    stop() the host's sysctls, iptables rules, links, cgroups, mounts and fixed paths are as
    before (the session's nodes are checked the same way when the session ends)."""
    extra = RealNodes(cluster, count=1)
    before = HostState.capture(under=(str(extra.root),))
    with pytest.raises(RuntimeError, match="failed on purpose"):
        try:
            extra.start()
            core = client.CoreV1Api(cluster.api())
            namespace = cluster.new_namespace("restore", pod_security=None)
            core.create_namespaced_pod(namespace, probe_pod(
                "left-running", extra, ["print", "x"], node_name=extra.names[0]))
            _phase(cluster, namespace, "left-running", {"Running"})
            during = "\n".join(before.differences(HostState.capture(under=(str(extra.root),))))
            # The snapshot sees what a node changes: its bridge, its cgroups, its mounts.
            assert f"new network link br{extra.tag}0" in during
            assert f"new cgroup memory/bloomrun-{extra.tag}-" in during
            assert "new mount" in during and HostState.capture().sysctls["net.ipv4.ip_forward"] == "1"
            raise RuntimeError("failed on purpose, with a pod still running")
        finally:
            leftovers = extra.stop()
    assert leftovers == []
    shared = foreign_nodes_running(str(cluster.layout.root))
    assert before.differences(before.again(), shared=shared, own=extra.own_prefixes) == []
