"""The test cluster is a real control plane: scheduling onto GPU pools, garbage collection,
validation, Pod Security admission and RBAC all come from Kubernetes itself, and the
fixture's fault levers behave as a kubelet-backed cluster would."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster.nodes import POOLS

pytestmark = pytest.mark.cluster

GPU = "nvidia.com/gpu"


def gpu_pod(name: str, gpus: int, pool: str = "a100-80gb", **spec) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": POOLS[pool].selector,
            "tolerations": POOLS[pool].tolerations,
            "containers": [{"name": "trainer", "image": "bloomrun/trainer:test",
                            "resources": {"limits": {GPU: str(gpus)}}}],
            **spec,
        },
    }


def cpu_pod(name: str, **metadata) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **metadata},
            "spec": {"restartPolicy": "Never",
                     "containers": [{"name": "main", "image": "busybox:test"}]}}


@pytest.fixture
def core(cluster):
    return client.CoreV1Api(cluster.api())


@pytest.fixture
def namespace(cluster):
    return cluster.new_namespace("smoke")


def running(cluster, namespace, name, timeout=30):
    return cluster.wait_for_pod(namespace, name, lambda p: p.status.phase == "Running",
                                timeout, "Running")


def test_a100_pools_advertise_eight_gpus_behind_a_taint(core):
    for pool, product in (("a100-80gb", "NVIDIA-A100-SXM4-80GB"),
                          ("a100-40gb", "NVIDIA-A100-SXM4-40GB")):
        nodes = core.list_node(label_selector=f"bloomrun.io/pool={pool}").items
        assert len(nodes) >= 2
        for node in nodes:
            assert node.status.allocatable[GPU] == "8"
            assert node.metadata.labels["nvidia.com/gpu.product"] == product
            assert node.metadata.labels["nvidia.com/gpu.count"] == "8"
            assert [(t.key, t.effect) for t in node.spec.taints] == [(GPU, "NoSchedule")]
    cpu_nodes = core.list_node(label_selector="bloomrun.io/pool=cpu").items
    assert cpu_nodes and all(GPU not in n.status.allocatable for n in cpu_nodes)


def test_scheduler_binds_a_full_node_gpu_pod_to_the_80gb_pool(cluster, core, namespace):
    core.create_namespaced_pod(namespace, gpu_pod("full-node", 8))
    pod = running(cluster, namespace, "full-node")
    node = core.read_node(pod.spec.node_name)
    assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    events = cluster.wait(lambda: core.list_namespaced_event(
        namespace, field_selector="involvedObject.name=full-node,reason=Scheduled").items,
        10, "the scheduler's Scheduled event")  # events are written asynchronously
    assert events[0].reporting_component == "default-scheduler"


def test_pod_asking_more_gpus_than_a_node_has_stays_pending_with_the_reason(
        cluster, core, namespace):
    core.create_namespaced_pod(namespace, gpu_pod("too-big", 9))

    def unschedulable(pod):
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable"
                   for c in pod.status.conditions or [])
    pod = cluster.wait_for_pod(namespace, "too-big", unschedulable, 30, "Unschedulable")
    condition = next(c for c in pod.status.conditions if c.type == "PodScheduled")
    assert "Insufficient nvidia.com/gpu" in condition.message
    assert pod.status.phase == "Pending" and pod.spec.node_name is None


def test_garbage_collector_deletes_a_pod_whose_owner_is_deleted(cluster, core, namespace):
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                 "uid": owner.metadata.uid}
    core.create_namespaced_pod(namespace, cpu_pod("owned", ownerReferences=[reference]))
    running(cluster, namespace, "owned")
    core.delete_namespaced_config_map("owner", namespace)

    def gone():
        return not core.list_namespaced_pod(namespace, field_selector="metadata.name=owned").items
    cluster.wait(gone, 30, "the garbage collector to delete the owned pod")


def test_apiserver_validation_refuses_an_invalid_object(cluster, namespace):
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"},
               "spec": {"ports": [{"port": 70000}]}}
    result = cluster.kubectl("-n", namespace, "create", "-f", "-", input=json.dumps(service),
                             check=False)
    assert result.returncode != 0
    assert "is invalid" in result.stderr and "spec.ports[0].port" in result.stderr


def test_pod_security_admission_refuses_a_privileged_pod_in_a_restricted_namespace(
        cluster, core):
    restricted = cluster.new_namespace("restricted", pod_security="restricted")
    pod = cpu_pod("privileged")
    pod["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(restricted, pod)
    assert refused.value.status == 403
    message = json.loads(refused.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest"' in message
    assert "privileged" in message
    # The same pod is admitted where no level is enforced.
    open_namespace = cluster.new_namespace("open", pod_security=None)
    core.create_namespaced_pod(open_namespace, pod)


def test_fail_pod_oomkilled_stays_failed(cluster, core, namespace):
    core.create_namespaced_pod(namespace, gpu_pod("oom", 8))
    running(cluster, namespace, "oom")
    cluster.fail_pod(namespace, "oom", reason="OOMKilled")
    time.sleep(3)  # long enough for kwok to have overwritten it if any stage matched
    pod = core.read_namespaced_pod("oom", namespace)
    assert pod.status.phase == "Failed"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.reason, terminated.exit_code) == ("OOMKilled", 137)


def test_fail_pod_with_exit_code_eviction_and_success(cluster, core, namespace):
    for name in ("crash", "evicted", "done"):
        core.create_namespaced_pod(namespace, cpu_pod(name))
    for name in ("crash", "evicted", "done"):
        running(cluster, namespace, name)
    cluster.fail_pod(namespace, "crash", exit_code=3)
    cluster.fail_pod(namespace, "evicted", reason="Evicted")
    cluster.succeed_pod(namespace, "done")
    crash = core.read_namespaced_pod("crash", namespace)
    assert crash.status.container_statuses[0].state.terminated.exit_code == 3
    evicted = core.read_namespaced_pod("evicted", namespace)
    assert (evicted.status.phase, evicted.status.reason) == ("Failed", "Evicted")
    assert any(c.type == "DisruptionTarget" for c in evicted.status.conditions)
    done = core.read_namespaced_pod("done", namespace)
    assert done.status.phase == "Succeeded"
    assert done.status.container_statuses[0].state.terminated.exit_code == 0


def test_node_not_ready_is_tainted_by_the_node_controller_and_recovers(cluster, core):
    cluster.add_node("flaky-0", "cpu")
    cluster.set_node_ready("flaky-0", False)

    def tainted():
        node = core.read_node("flaky-0")
        return any(t.key == "node.kubernetes.io/not-ready" for t in node.spec.taints or [])
    cluster.wait(tainted, 30, "the node lifecycle controller's not-ready taint")
    ready = next(c for c in core.read_node("flaky-0").status.conditions if c.type == "Ready")
    assert ready.status == "False"  # kwok did not flip it back
    cluster.set_node_ready("flaky-0", True)
    cluster.wait(lambda: not tainted(), 30, "the not-ready taint to go")
    cluster.delete_node("flaky-0")


def test_added_node_takes_pods_and_deleted_node_disappears(cluster, core, namespace):
    cluster.add_node("extra-80gb", "a100-80gb")
    pod = gpu_pod("pinned", 8)
    pod["spec"]["nodeSelector"]["kubernetes.io/hostname"] = "extra-80gb"
    core.create_namespaced_pod(namespace, pod)
    assert running(cluster, namespace, "pinned").spec.node_name == "extra-80gb"
    cluster.delete_node("extra-80gb")
    assert all(n.metadata.name != "extra-80gb" for n in core.list_node().items)


def test_cluster_keeps_working_after_an_apiserver_restart(cluster, namespace):
    core = client.CoreV1Api(cluster.api())
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "kept"},
                                                  "data": {"k": "v"}})
    cluster.restart_apiserver()
    assert core.read_namespaced_config_map("kept", namespace).data == {"k": "v"}
    # The scheduler and kwok reconnected: a new pod is bound and run.
    core.create_namespaced_pod(namespace, gpu_pod("after-restart", 8))
    running(cluster, namespace, "after-restart", timeout=60)


def test_impersonated_service_account_is_held_to_its_rbac(cluster, core, namespace):
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    user = f"system:serviceaccount:{namespace}:reader"
    as_reader = client.CoreV1Api(cluster.impersonating(user))
    with pytest.raises(ApiException) as refused:
        as_reader.list_namespaced_pod(namespace)
    assert refused.value.status == 403
    rbac = client.RbacAuthorizationV1Api(cluster.api())
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]})
    cluster.wait(lambda: _allowed(as_reader, namespace), 10, "the RoleBinding to apply")
    with pytest.raises(ApiException):
        as_reader.list_namespaced_secret(namespace)
    # A real token of the same account carries the same identity.
    whoami = cluster.kubectl("--kubeconfig", cluster.token_kubeconfig(namespace, "reader"),
                             "auth", "whoami", "-o", "json")
    assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == user


def test_impersonation_carries_several_groups(cluster):
    api = cluster.impersonating("alice", groups=["team-a", "team-b"])
    review = client.AuthenticationV1Api(api).create_self_subject_review({})
    assert review.status.user_info.username == "alice"
    assert {"team-a", "team-b"} <= set(review.status.user_info.groups)


def _allowed(api: client.CoreV1Api, namespace: str) -> bool:
    try:
        api.list_namespaced_pod(namespace)
        return True
    except ApiException as error:
        if error.status == 403:
            return False
        raise


def test_helm_installs_a_chart_into_the_cluster(cluster, namespace, tmp_path):
    chart = tmp_path / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: tiny\nversion: 0.1.0\n"
                                      "kubeVersion: '>=1.30.0-0'\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    cluster.helm("install", "demo", str(chart), "-n", namespace, "--wait")
    data = client.CoreV1Api(cluster.api()).read_namespaced_config_map("demo-cm", namespace).data
    assert data == {"greeting": "hello"}


def test_prometheus_scrapes_and_fires_an_alert(cluster, tmp_path):
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    from tests.cluster.processes import free_port
    registry = CollectorRegistry()
    Gauge("smoke_temperature", "a value the test sets", registry=registry).set(42)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    rules = tmp_path / "rules.yaml"
    rules.write_text("groups:\n- name: smoke\n  rules:\n  - alert: TooHot\n"
                     "    expr: smoke_temperature > 40\n")
    prometheus = cluster.start_prometheus(
        [{"job_name": "smoke", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
        rule_files=[rules])
    try:
        sample = prometheus.wait_for('smoke_temperature{job="smoke"}')
        assert float(sample[0]["value"][1]) == 42
        cluster.wait(lambda: any(a["labels"]["alertname"] == "TooHot" and
                                  a["state"] == "firing" for a in prometheus.alerts()),
                      30, "the TooHot alert to fire")
    finally:
        prometheus.stop()
        server.shutdown()


def test_created_pvc_is_bound_and_a_pod_using_it_runs(cluster, core, namespace):
    cluster.create_pvc(namespace, "checkpoints", size="50Gi")
    pod = gpu_pod("with-volume", 8)
    pod["spec"]["volumes"] = [{"name": "ckpt",
                               "persistentVolumeClaim": {"claimName": "checkpoints"}}]
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "ckpt", "mountPath": "/ckpt"}]
    core.create_namespaced_pod(namespace, pod)
    running(cluster, namespace, "with-volume")


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_text(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue  # exited while we looked
    return found


def test_a_failing_session_stops_every_process_and_keeps_the_logs(tmp_path):
    inner = tmp_path / "test_inner.py"
    inner.write_text("def test_fails(cluster):\n"
                     "    print('STATE', cluster.layout.root)\n"
                     "    assert False\n")
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "-p", "tests.cluster.fixture", str(inner)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode == 1, result.stdout + result.stderr
    root = re.search(r"STATE (\S+)", result.stdout).group(1)
    try:
        assert _processes_mentioning(root) == []
        assert "--secure-port" in (Path(root) / "logs" / "kube-apiserver.log").read_text()
        assert not (Path(root) / "etcd").exists()  # the bulky part goes all the same
    finally:
        shutil.rmtree(root, ignore_errors=True)
