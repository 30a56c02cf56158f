"""The operator on the real control plane: scheduling onto A100 pools, failures, elasticity,
suspend, deletion, operator restarts, progress from the trainer's own identity.

Worker pods are run by kwok (no containers): tests end them with the cluster's fault levers
the way a kubelet would report it. The operator is a real subprocess.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

import pytest
import yaml
from kubernetes import client

from bloomrun.operator.spec import GROUP, PLURAL, VERSION
from bloomrun.trainer.progress import ProgressReporter

from .e2e import BASE_SPEC, Operator, Runs, install_crds, wait_for

pytestmark = [pytest.mark.cluster]


@pytest.fixture(scope="module")
def crd(cluster):
    install_crds(cluster)


@pytest.fixture(scope="module")
def operator(cluster, crd):
    # Only this suite's namespaces, so the peering test can run operators of its own.
    op = Operator(cluster, "--standalone", "--namespace", "br-*", "--namespace", "fuzz-*")
    yield op
    op.stop()


@pytest.fixture
def runs(cluster, crd, request):
    namespace = cluster.new_namespace("br", pod_security="restricted")
    # A test that uses the module's operator gets its log with a wait that timed out.
    handle = Runs(cluster, namespace, request.getfixturevalue("operator") if "operator" in request.fixturenames
                  else None)
    yield handle
    # The namespace first: deleting the nodes under live runs would only make node-loss noise.
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    handle.cleanup()


def test_a_run_is_scheduled_onto_the_a100_80gb_pool_and_reports_running(runs, operator, cluster):
    nodes = runs.add_nodes(2)
    runs.create(runs.manifest("ablation", nodes, 2, 2, parallel={"tensor": 2, "pipeline": 2},
                              training=BASE_SPEC["training"] | {"zeroStage": 1}))
    status = runs.wait_phase("ablation", "Running")
    assert status["nodes"] == {"desired": 2, "ready": 2, "display": "2/2"}
    # 2 nodes x 8 GPUs = 16 ranks in replicas of 2 x 2: 4 data-parallel.
    assert status["layout"] == {"tensor": 2, "pipeline": 2, "data": 4, "display": "2x2x4"}
    pods = runs.running_pods("ablation")
    assert sorted(p.spec.node_name for p in pods) == sorted(nodes)
    for pod in pods:
        container = pod.spec.containers[0]
        assert container.resources.limits["nvidia.com/gpu"] == "8"
        assert f"--rdzv-id={runs.get('ablation')['metadata']['uid']}" in container.command
        assert pod.metadata.owner_references[0].kind == "BloomRun"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Running"]["status"] == "True" and conditions["Scheduled"]["status"] == "True"
    assert conditions["Running"]["observedGeneration"] == 1
    # Children: headless Service, resolved config, trainer RBAC.
    service = runs.core.read_namespaced_service("ablation", runs.namespace)
    assert service.spec.cluster_ip == "None"
    config = yaml.safe_load(runs.core.read_namespaced_config_map("ablation-config", runs.namespace).data["config.yaml"])
    uid = runs.get("ablation")["metadata"]["uid"]
    assert config["checkpoint"]["dir"] == f"/checkpoints/{runs.namespace}/ablation/{uid}"  # its own folder
    assert {e.reason for e in runs.events("ablation")} >= {"Running"}
    # Printer columns.
    table = cluster.kubectl("get", "br", "-n", runs.namespace).stdout
    assert table.split()[:10] == ["NAME", "PHASE", "NODES", "STEP", "LOSS", "TOKENS/S", "RESTARTS", "GOODPUT", "EVAL",
                                  "AGE"]
    assert "ablation" in table and "Running" in table and "2/2" in table
    wide = cluster.kubectl("get", "br", "-n", runs.namespace, "-o", "wide").stdout.split("\n")
    assert wide[0].split()[:4] == ["NAME", "PHASE", "NODES", "LAYOUT"] and wide[1].split()[3] == "2x2x4"


def test_bloom_176b_with_tensor_4_pipeline_12_is_placed_on_48_nodes(runs, operator):
    """The final model's layout (../shared/PAPER.md: T4 x P12 x DP8 on 384 A100s): the manifest
    passes the API server's checks and the operator places one worker per node, eight ranks
    each, so every tensor group of 4 is inside a node and the 12 stages span 6 nodes."""
    nodes = runs.add_nodes(48)
    manifest = runs.manifest("bloom", nodes, 48, 48, model={"preset": "176b"}, parallel={"tensor": 4, "pipeline": 12},
                             training={"trainSteps": 20, "globalBatchSize": 2048, "microBatchSize": 2, "zeroStage": 1})
    # 48 host names are more than the CRD's 32 affinity values: these nodes get a label instead.
    for name in nodes:
        runs.core.patch_node(name, {"metadata": {"labels": {"e2e.bloomrun.io/set": runs.namespace}}})
    manifest["spec"]["pool"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "e2e.bloomrun.io/set", "operator": "In", "values": [runs.namespace]}]}]}
    runs.create(manifest)
    status = runs.wait_phase("bloom", "Running", timeout=120)
    assert status["layout"] == {"tensor": 4, "pipeline": 12, "data": 8, "display": "4x12x8"}
    assert status["nodes"]["display"] == "48/48"
    pods = runs.running_pods("bloom")
    assert sorted(p.spec.node_name for p in pods) == sorted(nodes)  # one worker per node
    for pod in pods:
        container = pod.spec.containers[0]
        assert container.resources.limits["nvidia.com/gpu"] == "8"
        assert "--nproc-per-node=8" in container.command  # 8 local ranks: two whole tensor groups


def test_runs_sharing_a_checkpoint_claim_write_to_folders_of_their_own(runs, operator):
    """Two arms of a study on one claim, and an arm deleted and re-created under its name:
    three folders, so none can resume another's checkpoints (the trainer checks too)."""
    nodes = runs.add_nodes(2)
    claim = {"checkpointVolume": {"claimName": "bloom-ablations-checkpoints"}}

    def written(name: str) -> str | None:
        try:
            config_map = runs.core.read_namespaced_config_map(f"{name}-config", runs.namespace)
        except client.ApiException as err:
            if err.status == 404:
                return None
            raise
        return yaml.safe_load(config_map.data["config.yaml"])["checkpoint"]["dir"]

    def folder(name: str) -> str:
        return wait_for(lambda: written(name), 30, f"{name}'s ConfigMap")

    def gone(name: str) -> bool:
        try:
            runs.get(name)
        except client.ApiException as err:
            return err.status == 404
        return False

    runs.create(runs.manifest("arm-a", nodes[:1], 1, 1, **claim))
    runs.create(runs.manifest("arm-b", nodes[1:], 1, 1, **claim))
    first_a, b = folder("arm-a"), folder("arm-b")
    runs.delete("arm-a")
    wait_for(lambda: gone("arm-a"), 60, "arm-a deleted")
    runs.create(runs.manifest("arm-a", nodes[:1], 1, 1, **claim))
    second_a = wait_for(lambda: (lambda f: f if f not in (None, first_a) else None)(written("arm-a")), 60,
                        "the re-created arm-a's own folder")
    assert len({first_a, b, second_a}) == 3
    assert second_a.startswith(f"/checkpoints/{runs.namespace}/arm-a/")


def test_a_run_named_after_an_existing_service_account_fails_without_touching_it(runs, operator):
    """A user who may create BloomRuns must not get to run as, rewrite or garbage-collect an
    object of someone else's by naming a run after it."""
    nodes = runs.add_nodes(1)
    runs.core.create_namespaced_service_account(runs.namespace, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="taken-trainer", labels={"owner": "another-team"})))
    runs.create(runs.manifest("taken", nodes, 1, 1))
    status = runs.wait_phase("taken", "Failed")
    assert "ServiceAccount" in status["message"] and "taken-trainer" in status["message"]
    account = runs.core.read_namespaced_service_account("taken-trainer", runs.namespace)
    assert not account.metadata.owner_references and account.metadata.labels == {"owner": "another-team"}
    assert not runs.live_pods("taken")
    # Once the name is free, the run goes ahead.
    runs.core.delete_namespaced_service_account("taken-trainer", runs.namespace)
    runs.wait_phase("taken", "Running", timeout=60)


def test_a_retryable_failure_is_replaced_and_counted_once(runs, operator, cluster):
    nodes = runs.add_nodes(2)
    runs.create(runs.manifest("retry", nodes, 2, 2))
    runs.wait_phase("retry", "Running")
    victim = runs.core.read_namespaced_pod("retry-worker-1", runs.namespace)
    cluster.fail_pod(runs.namespace, "retry-worker-1", exit_code=137)
    wait_for(lambda: any(p.metadata.name == "retry-worker-1" and p.metadata.uid != victim.metadata.uid
                         for p in runs.running_pods("retry")), 30, "the replacement worker")
    status = runs.wait_phase("retry", "Running")
    assert status["restarts"] == 1 and status["restartsByReason"] == {"RetryableExitCode": 1}
    assert status["lastFailure"]["exitCode"] == 137
    assert len(runs.live_pods("retry")) == 2
    assert "WorkerFailed" in {e.reason for e in runs.events("retry")}
    assert 'bloomrun_operator_restarts_total{namespace="%s",reason="RetryableExitCode",run="retry"} 1.0' % (
        runs.namespace) in operator.metrics()


def test_children_deleted_by_hand_come_back(runs, operator):
    nodes = runs.add_nodes(1)
    runs.create(runs.manifest("mended", nodes, 1, 1))
    runs.wait_phase("mended", "Running")
    core, ns = runs.core, runs.namespace
    config_uid = core.read_namespaced_config_map("mended-config", ns).metadata.uid
    service_uid = core.read_namespaced_service("mended", ns).metadata.uid
    core.delete_namespaced_config_map("mended-config", ns)
    core.delete_namespaced_service("mended", ns)

    def recreated(read, name, old_uid):
        try:
            return read(name, ns).metadata.uid != old_uid
        except client.ApiException as err:
            if err.status == 404:
                return False
            raise
    # The spec did not change: only seeing the children gone brings them back.
    wait_for(lambda: recreated(core.read_namespaced_config_map, "mended-config", config_uid)
             and recreated(core.read_namespaced_service, "mended", service_uid), 30, "the children to come back")
    assert core.read_namespaced_service("mended", ns).spec.cluster_ip == "None"
    wait_for(lambda: "ChildrenRecreated" in {e.reason for e in runs.events("mended")}, 10, "the event")
    assert runs.status("mended")["restarts"] == 0


def test_a_worker_deleted_while_the_operator_is_down_is_replaced_and_counted(runs, operator):
    nodes = runs.add_nodes(2)
    runs.create(runs.manifest("orphaned", nodes, 2, 2))
    runs.wait_phase("orphaned", "Running")
    wait_for(lambda: len(runs.status("orphaned").get("workers", [])) == 2, 30, "both workers recorded")
    victim = runs.core.read_namespaced_pod("orphaned-worker-1", runs.namespace).metadata.uid
    operator.child.stop(grace=0.1)
    try:
        runs.core.delete_namespaced_pod("orphaned-worker-1", runs.namespace, grace_period_seconds=0)
        wait_for(lambda: all(p.metadata.uid != victim for p in runs.pods("orphaned")), 30, "the pod to go")
    finally:
        operator.child.start()
        operator.wait_live()
    status = runs.wait_status("orphaned", lambda s: s.get("restarts") == 1, 30, "the loss to be counted")
    assert status["restartsByReason"] == {"PodLost": 1} and status["lastFailure"]["podUid"] == victim
    runs.wait_running_pods("orphaned", 2)
    assert runs.status("orphaned")["restarts"] == 1


def test_a_permanent_exit_code_fails_the_run(runs, operator, cluster):
    nodes = runs.add_nodes(2)
    runs.create(runs.manifest("permanent", nodes, 2, 2))
    runs.wait_phase("permanent", "Running")
    cluster.fail_pod(runs.namespace, "permanent-worker-0", exit_code=2)
    status = runs.wait_phase("permanent", "Failed")
    assert "exit code 2" in status["message"] and status["restarts"] == 0
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PermanentExitCode"
    wait_for(lambda: not runs.live_pods("permanent"), 30, "the other workers to be stopped")


def test_max_restarts_exhausted_fails_the_run(runs, operator, cluster):
    nodes = runs.add_nodes(1)
    runs.create(runs.manifest("flaky", nodes, 1, 1, restartPolicy={"maxRestarts": 1, "backoffSeconds": 0}))
    for attempt in range(2):
        pod = runs.wait_running_pods("flaky", 1)[0]
        cluster.fail_pod(runs.namespace, pod.metadata.name, reason="OOMKilled")
        if attempt == 0:
            wait_for(lambda: runs.status("flaky").get("restarts") == 1, 30, "the first restart")
    status = runs.wait_phase("flaky", "Failed")
    assert status["restarts"] == 2 and status["restartsByReason"] == {"OOMKilled": 2}
    assert next(c for c in status["conditions"] if c["type"] == "Failed")["reason"] == "RestartLimitExceeded"


def test_too_few_gpus_waits_in_pending_with_the_schedulers_reason(runs, operator):
    nodes = runs.add_nodes(1)
    runs.create(runs.manifest("starved", nodes, 2, 2))
    status = runs.wait_status("starved", lambda s: "scheduler" in s.get("message", ""), 30, "a scheduler reason")
    assert status["phase"] == "Pending"
    assert "Insufficient nvidia.com/gpu" in status["message"] or "didn't match" in status["message"]
    scheduled = next(c for c in status["conditions"] if c["type"] == "Scheduled")
    assert scheduled["status"] == "False" and scheduled["reason"] == "Unschedulable"


def test_losing_a_node_keeps_the_run_at_min_and_it_scales_back_up(runs, operator, cluster):
    nodes = runs.add_nodes(3)
    spare = f"{nodes[0]}-spare"
    runs.create(runs.manifest("elastic", nodes + [spare], 2, 3))
    runs.wait_phase("elastic", "Running")
    runs.wait_running_pods("elastic", 3)
    # worker-0's node: once the hardest case (worker-0 hosted the rendezvous store); now the
    # store runs in a pod of its own and worker-0 is a worker like the others.
    lost = next(p for p in runs.running_pods("elastic") if p.metadata.name == "elastic-worker-0")
    cluster.delete_node(lost.spec.node_name)
    status = runs.wait_status("elastic", lambda s: s.get("restartsByReason", {}).get("NodeLost") == 1, 30,
                              "the node loss to be counted")
    def two_running_worker_0_waiting():
        live = runs.live_pods("elastic")
        running = {p.metadata.name for p in live if p.status.phase == "Running"}
        return running == {"elastic-worker-1", "elastic-worker-2"} and len(live) == 3
    wait_for(two_running_worker_0_waiting, 30, "the other two running, worker-0 waiting for a node")
    assert lost.metadata.uid not in {p.metadata.uid for p in runs.pods("elastic")}
    status = runs.wait_status("elastic", lambda s: s.get("nodes", {}).get("ready") == 2, 30, "2 of 3 running")
    assert status["phase"] == "Running"
    assert status["layout"]["display"] == "1x1x16"  # the data-parallel degree follows: 2 nodes x 8
    cluster.add_node(spare, "a100-80gb")
    runs.nodes.append(spare)
    # The scheduler retries the waiting pod on the node's events, after its backoff (up to
    # 10 s once it has failed several times); 30 s was too short once in CI's full run.
    runs.wait_running_pods("elastic", 3, timeout=60)
    status = runs.wait_status("elastic", lambda s: s.get("nodes", {}).get("ready") == 3, 30, "3 of 3 running")
    assert status["restarts"] == 1 and status["layout"]["display"] == "1x1x24"


def test_a_worker_stuck_terminating_on_a_node_not_ready_is_forced_out_and_replaced(runs, operator, cluster):
    """A node stops reporting; its worker is evicted (here with a 1 s grace; the taint manager
    does it after 5 minutes) and stays Terminating, since no kubelet confirms: its fixed name
    would block the replacement for good. STUCK_TERMINATING_S after its grace, with the node
    still not Ready, the operator deletes it with grace 0 and the replacement takes a spare node.

    The lost node is one kwok never manages and the test plays its kubelet (kwok keeps
    removing deleted pods of a node the NotReady lever took from it: seen with v0.8.0)."""
    from bloomrun.operator.reconcile import STUCK_TERMINATING_S
    from tests.cluster.nodes import KWOK_ANNOTATION, POOLS, node_manifest, schedulable

    (kept,) = runs.add_nodes(1)
    lost, spare = f"{kept}-lost", f"{kept}-spare"
    node = node_manifest(lost, POOLS["a100-80gb"])
    del node["metadata"]["annotations"][KWOK_ANNOTATION]
    runs.core.create_node(node)
    runs.nodes.append(lost)
    cluster._patch_ready(lost, "True", "KubeletReady", "the test is its kubelet")
    wait_for(lambda: schedulable(runs.core.read_node(lost)), 30, f"node {lost} Ready")
    runs.create(runs.manifest("partitioned", [kept, lost, spare], 1, 2))
    victim = wait_for(lambda: next((p for p in runs.pods("partitioned") if p.spec.node_name == lost), None), 30,
                      f"a worker bound to {lost}")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    runs.core.patch_namespaced_pod_status(victim.metadata.name, runs.namespace, {"status": {
        "phase": "Running", "startTime": now,
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
        "containerStatuses": [{"name": c.name, "image": c.image, "imageID": "", "ready": True, "restartCount": 0,
                               "started": True, "state": {"running": {"startedAt": now}}}
                              for c in victim.spec.containers]}})
    runs.wait_status("partitioned", lambda s: s.get("nodes", {}).get("ready") == 2, 30, "2 of 2 running")
    # The node stops reporting; its worker is evicted and no kubelet confirms it.
    cluster._patch_ready(lost, "False", "NodeStatusUnknown", "Kubelet stopped posting node status.")
    runs.core.delete_namespaced_pod(victim.metadata.name, runs.namespace, grace_period_seconds=1)
    cluster.add_node(spare, "a100-80gb")
    runs.nodes.append(spare)
    stuck = lambda: [p for p in runs.pods("partitioned") if p.metadata.uid == victim.metadata.uid]  # noqa: E731
    time.sleep(STUCK_TERMINATING_S / 2)
    assert stuck() and stuck()[0].metadata.deletion_timestamp, "gone before the bound"
    assert runs.status("partitioned")["nodes"]["display"] == "1/2"
    status = runs.wait_status("partitioned", lambda s: s.get("nodes", {}).get("ready") == 2,
                              STUCK_TERMINATING_S + 60, "the replacement running")
    assert not stuck() and status["restartsByReason"] == {"NodeLost": 1}
    replacement = next(p for p in runs.running_pods("partitioned") if p.metadata.name == victim.metadata.name)
    assert replacement.spec.node_name == spare
    assert "WorkerForceDeleted" in {e.reason for e in runs.events("partitioned")}


def test_suspend_deletes_the_workers_and_resume_recreates_them(runs, operator):
    nodes = runs.add_nodes(2)
    runs.create(runs.manifest("pausable", nodes, 2, 2))
    runs.wait_phase("pausable", "Running")
    runs.patch_spec("pausable", {"suspend": True})
    runs.wait_phase("pausable", "Suspended")
    wait_for(lambda: not runs.live_pods("pausable"), 30, "the workers to go")
    runs.patch_spec("pausable", {"suspend": False})
    runs.wait_phase("pausable", "Running")
    assert len(runs.running_pods("pausable")) == 2 and runs.status("pausable")["restarts"] == 0


def test_deleting_the_run_removes_every_child(runs, operator):
    nodes = runs.add_nodes(1)
    runs.create(runs.manifest("doomed", nodes, 1, 1))
    runs.wait_phase("doomed", "Running")
    runs.delete("doomed")

    def children_gone():
        core, rbac, ns = runs.core, runs.rbac, runs.namespace
        left = [*core.list_namespaced_pod(ns, label_selector="bloomrun.io/run=doomed").items,
                *core.list_namespaced_service(ns, label_selector="bloomrun.io/run=doomed").items,
                *core.list_namespaced_config_map(ns, label_selector="bloomrun.io/run=doomed").items,
                *core.list_namespaced_service_account(ns, label_selector="bloomrun.io/run=doomed").items,
                *rbac.list_namespaced_role(ns, label_selector="bloomrun.io/run=doomed").items,
                *rbac.list_namespaced_role_binding(ns, label_selector="bloomrun.io/run=doomed").items]
        return not left
    wait_for(children_gone, 60, "the garbage collector to remove the children")


def test_a_finished_training_succeeds(runs, operator, cluster):
    nodes = runs.add_nodes(1)
    runs.create(runs.manifest("done", nodes, 1, 1))
    runs.wait_phase("done", "Running")
    cluster.succeed_pod(runs.namespace, "done-worker-0")
    status = runs.wait_phase("done", "Succeeded")
    assert status["completionTime"] and status["restarts"] == 0
    assert not runs.live_pods("done")


def test_the_gpu_hour_budget_stops_the_run_cleanly(runs, operator):
    nodes = runs.add_nodes(1)
    # 8 GPUs x 2.7 s = 0.006 GPU-hours.
    runs.create(runs.manifest("budgeted", nodes, 1, 1, budget={"gpuHours": 0.006}))
    status = runs.wait_phase("budgeted", "Succeeded", timeout=45)
    assert status["restarts"] == 0 and status["gpuHours"]["used"] >= 0.006
    assert next(c for c in status["conditions"] if c["type"] == "Succeeded")["reason"] == "GPUHourBudgetSpent"
    assert "GPUHourBudgetSpent" in {e.reason for e in runs.events("budgeted")}


def test_gpu_hours_while_the_operator_is_down_are_charged_from_what_the_pods_did(runs, operator, cluster):
    """The worker fails while the operator is down; back 20 s later, the operator charges the
    worker's 8 GPUs up to its container's end (the pod status says when), not for the whole
    outage at the last known size (issue 19)."""
    from bloomrun.operator.reconcile import parse_time

    nodes = runs.add_nodes(1)
    runs.create(runs.manifest("outage", nodes, 1, 1, restartPolicy={"backoffSeconds": 3600, "maxRestarts": 5}))
    runs.wait_phase("outage", "Running")
    operator.child.stop(grace=10)
    try:
        before = runs.status("outage")["gpuHours"]
        cluster.fail_pod(runs.namespace, "outage-worker-0", exit_code=143)
        finished = parse_time(runs.core.read_namespaced_pod("outage-worker-0", runs.namespace)
                              .status.container_statuses[0].state.terminated.finished_at.isoformat())
        time.sleep(20)
    finally:
        operator.child.start()
        operator.wait_live()
    back = datetime.now(timezone.utc)
    status = runs.wait_status("outage", lambda s: s.get("restartsByReason", {}).get("RetryableExitCode") == 1,
                              60, "the failure counted")
    charged = status["gpuHours"]["used"] - before["used"]
    ran = (finished - parse_time(before["accountedAt"])).total_seconds()
    assert charged == pytest.approx(8 * ran / 3600, abs=8 * 2 / 3600), (charged, ran)  # within 2 s
    outage = (back - finished).total_seconds()
    assert outage >= 20 and charged < 8 * (ran + outage - 15) / 3600  # the outage is not charged


def test_operator_restarts_and_a_rival_replica_make_no_duplicates(runs, operator, cluster):
    nodes = runs.add_nodes(4)
    runs.create(runs.manifest("steady", nodes, 4, 4))
    operator.restart(kill=True)  # SIGKILL in the middle of creating the workers
    rival = Operator(cluster, "--standalone", "--namespace", runs.namespace)  # two active replicas: the worst case peering prevents
    try:
        runs.wait_phase("steady", "Running")
        victim = runs.running_pods("steady")[0].metadata.name
        cluster.fail_pod(runs.namespace, victim, exit_code=143)
        wait_for(lambda: runs.status("steady").get("restarts", 0) >= 1, 30, "the restart to be counted")
        runs.wait_running_pods("steady", 4)
    finally:
        rival.stop()
    names = [p.metadata.name for p in runs.pods("steady")]
    assert sorted(names) == [f"steady-worker-{i}" for i in range(4)]
    assert runs.status("steady")["restarts"] == 1  # counted once by two operators


def test_the_trainer_reports_progress_with_its_own_identity_only(runs, operator, cluster, tmp_path):
    nodes = runs.add_nodes(1)
    runs.create(runs.manifest("reporter", nodes, 1, 1))
    runs.create(runs.manifest("neighbour", nodes, 1, 1, gpusPerNode=0))
    runs.wait_phase("reporter", "Running")
    kubeconfig = yaml.safe_load(open(cluster.token_kubeconfig(runs.namespace, "reporter-trainer")))
    token = tmp_path / "token"
    token.write_text(kubeconfig["users"][0]["user"]["token"])
    env = {"BLOOMRUN_RUN_NAME": "reporter", "BLOOMRUN_RUN_NAMESPACE": runs.namespace,
           "BLOOMRUN_RUN_UID": runs.get("reporter")["metadata"]["uid"], "BLOOMRUN_API_URL": cluster.server, "BLOOMRUN_TOKEN_FILE": str(token),
           "BLOOMRUN_CA_FILE": str(cluster.layout.pki.ca)}
    reporter = ProgressReporter.from_env(env)
    reporter.report(120, 1000, 7_864_320, 3.5, 51234.0, checkpoint_step=100,
                    checkpoint_time="2026-11-26T12:00:00Z", force=True)
    reporter.close()
    assert reporter.sent == 1
    progress = runs.status("reporter")["progress"]
    assert progress["step"] == 120 and progress["loss"] == 3.5 and progress["checkpointStep"] == 100
    table = cluster.kubectl("get", "br", "reporter", "-n", runs.namespace).stdout
    assert "120" in table and "3.5" in table and "51234" in table
    # The operator's own status writes leave the trainer's progress alone.
    runs.patch_spec("reporter", {"restartPolicy": {"maxRestarts": 6}})
    wait_for(lambda: runs.status("reporter").get("observedGeneration") == 2, 30, "a reconcile of generation 2")
    assert runs.status("reporter")["progress"]["step"] == 120
    # The same token may not touch another run, nor the run's spec.
    for path in (f"/apis/{GROUP}/{VERSION}/namespaces/{runs.namespace}/{PLURAL}/neighbour/status",
                 f"/apis/{GROUP}/{VERSION}/namespaces/{runs.namespace}/{PLURAL}/reporter"):
        request = urllib.request.Request(cluster.server + path, method="PATCH",
                                         data=json.dumps({"status": {"progress": {"step": 1}}}).encode(),
                                         headers={"Content-Type": "application/merge-patch+json",
                                                  "Authorization": f"Bearer {token.read_text()}"})
        context = ssl.create_default_context(cafile=str(cluster.layout.pki.ca))
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, context=context)
        assert err.value.code == 403


def test_a_trainer_of_a_deleted_run_cannot_write_the_status_of_the_run_created_in_its_place(
        runs, operator, cluster, tmp_path):
    """`kubectl delete` then `apply` at once: the old run's pods and ServiceAccount live on
    until the garbage collector is done, and their trainer's token with them, while the new
    run already has the name. The JSON patch's uid test (progress.py) refuses the old trainer."""
    nodes = runs.add_nodes(1)
    runs.create(runs.manifest("reborn", nodes, 1, 1))
    runs.wait_phase("reborn", "Running")
    first_uid = runs.get("reborn")["metadata"]["uid"]
    # A token that outlives the run (the run's own dies with its ServiceAccount a little later),
    # allowed what a run's trainer is allowed: get and patch the run's status.
    runs.core.create_namespaced_service_account(runs.namespace, {"metadata": {"name": "writer"}})
    runs.rbac.create_namespaced_role(runs.namespace, {"metadata": {"name": "writer"}, "rules": [
        {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]}]})
    runs.rbac.create_namespaced_role_binding(runs.namespace, {
        "metadata": {"name": "writer"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                    "name": "writer"},
        "subjects": [{"kind": "ServiceAccount", "name": "writer", "namespace": runs.namespace}]})
    token = tmp_path / "token"
    token.write_text(yaml.safe_load(open(cluster.token_kubeconfig(runs.namespace, "writer")))["users"][0]["user"]["token"])

    def reporter(uid: str) -> ProgressReporter:
        return ProgressReporter.from_env({
            "BLOOMRUN_RUN_NAME": "reborn", "BLOOMRUN_RUN_NAMESPACE": runs.namespace, "BLOOMRUN_RUN_UID": uid,
            "BLOOMRUN_API_URL": cluster.server, "BLOOMRUN_TOKEN_FILE": str(token),
            "BLOOMRUN_CA_FILE": str(cluster.layout.pki.ca)})

    old = reporter(first_uid)
    old.report(50, 100, 5000, 2.5, 100.0, force=True)
    wait_for(lambda: old.sent == 1, 30, "the first run's trainer to report")
    assert runs.status("reborn")["progress"]["step"] == 50

    runs.delete("reborn")
    wait_for(lambda: "reborn" not in {r["metadata"]["name"] for r in runs.custom.list_namespaced_custom_object(
        GROUP, VERSION, runs.namespace, PLURAL)["items"]}, 60, "the first run to be deleted")
    runs.create(runs.manifest("reborn", nodes, 1, 1))
    runs.wait_phase("reborn", "Running")
    assert runs.get("reborn")["metadata"]["uid"] != first_uid
    old.report(60, 100, 6000, 2.4, 100.0, force=True)
    old.close()
    assert old.superseded and old.sent == 1, "the old trainer's patch was not refused"
    assert "step" not in runs.status("reborn").get("progress", {}), runs.status("reborn")
    new = reporter(runs.get("reborn")["metadata"]["uid"])
    new.report(1, 100, 100, 9.0, 100.0, force=True)
    new.close()
    assert new.sent == 1 and runs.status("reborn")["progress"]["step"] == 1


def test_a_trainer_token_may_write_progress_and_nothing_else_of_the_status(runs, operator, cluster, tmp_path):
    """The chart's admission policy (bloomrun/operator/policy.py): GPU-hours, restarts and
    phase are what the operator decides from, so the trainer's account may not forge them."""
    from tests.chart.helm import render

    # The trainer-status policy and its binding (the chart's run policy is another test's).
    policy = [o for o in render() if o["kind"].startswith("ValidatingAdmissionPolicy")
              and o["metadata"]["name"].endswith("-trainer-status")]
    assert [o["kind"] for o in policy] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump_all(policy))
    cluster.kubectl("apply", "-f", str(policy_file))
    nodes = runs.add_nodes(1)
    runs.create(runs.manifest("guarded", nodes, 1, 1))
    runs.wait_phase("guarded", "Running")
    kubeconfig = yaml.safe_load(open(cluster.token_kubeconfig(runs.namespace, "guarded-trainer")))
    token = kubeconfig["users"][0]["user"]["token"]
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{runs.namespace}/{PLURAL}/guarded/status"
    context = ssl.create_default_context(cafile=str(cluster.layout.pki.ca))

    def patch(status: dict) -> int:
        request = urllib.request.Request(cluster.server + path, method="PATCH", data=json.dumps({"status": status}).encode(),
                                         headers={"Content-Type": "application/merge-patch+json",
                                                  "Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, context=context) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    forged = [{"gpuHours": {"used": 0.0, "accountedAt": "2030-01-01T00:00:00Z"}}, {"restarts": 5}, {"restartsByReason": {"oom-killed": 9}},
              {"phase": "Succeeded"}, {"conditions": []}, {"handledFailures": ["x"]}]
    # The policy takes effect moments after it is created: wait for a refusal of a harmless
    # change that differs each time (a forged value accepted before the policy is active
    # would make the same value a no-op later, which the policy rightly lets through).
    probes = iter(range(10**6))
    wait_for(lambda: patch({"message": f"probe {next(probes)}"}) in (403, 422), 60,
             "the admission policy to refuse a status change", 1.0)
    for status in forged:
        assert patch(status) in (403, 422), status
    assert patch({"progress": {"step": 7, "loss": 2.5}}) == 200
    assert runs.status("guarded")["progress"]["step"] == 7
    # The trainer's own reporter (a JSON patch testing the run's uid) passes the policy too.
    token_file = tmp_path / "token"
    token_file.write_text(token)
    reporter = ProgressReporter.from_env({
        "BLOOMRUN_RUN_NAME": "guarded", "BLOOMRUN_RUN_NAMESPACE": runs.namespace,
        "BLOOMRUN_RUN_UID": runs.get("guarded")["metadata"]["uid"], "BLOOMRUN_API_URL": cluster.server,
        "BLOOMRUN_TOKEN_FILE": str(token_file), "BLOOMRUN_CA_FILE": str(cluster.layout.pki.ca)})
    reporter.report(8, 100, 800, 2.4, 10.0, force=True)
    reporter.close()
    assert reporter.sent == 1 and runs.status("guarded")["progress"]["step"] == 8
    # The operator's own writes go on (it is not a trainer's account).
    runs.patch_spec("guarded", {"restartPolicy": {"maxRestarts": 6}})
    wait_for(lambda: runs.status("guarded").get("observedGeneration") == 2, 30, "the operator's status write")
    cluster.kubectl("delete", "-f", str(policy_file), "--wait=false")


def test_operator_metrics_are_served(runs, operator):
    nodes = runs.add_nodes(1)
    runs.create(runs.manifest("observed", nodes, 1, 1))
    runs.wait_phase("observed", "Running")
    text = wait_for(lambda: (lambda t: t if f'run="observed"' in t else None)(operator.metrics()), 15,
                    "the run's series")
    labels = f'namespace="{runs.namespace}",phase="Running",run="observed"'
    assert f"bloomrun_run_phase{{{labels}}} 1.0" in text
    assert f'bloomrun_run_nodes_ready{{namespace="{runs.namespace}",run="observed"}} 1.0' in text
    for name in ("bloomrun_operator_runs", "bloomrun_operator_reconcile_duration_seconds_bucket",
                 "bloomrun_operator_time_to_running_seconds_count", "bloomrun_run_gpu_used_seconds"):
        assert name in text


def test_replicas_coordinate_through_kopf_peering(cluster, crd):
    namespace = cluster.new_namespace("peer", pod_security="restricted")
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "bloomrun", "namespace": namespace}}))
    runs = Runs(cluster, namespace)
    high = Operator(cluster, "--namespace", namespace, "--peering", "bloomrun", "--priority", "20")
    low = Operator(cluster, "--namespace", namespace, "--peering", "bloomrun", "--priority", "10")
    try:
        nodes = runs.add_nodes(2)
        peering = lambda: cluster.kubectl("get", "kopfpeering", "bloomrun", "-n", namespace, "-o", "json").stdout  # noqa
        wait_for(lambda: len(json.loads(peering()).get("status") or {}) == 2, 30, "both replicas in the peering")
        runs.create(runs.manifest("first", nodes, 1, 1))
        runs.wait_phase("first", "Running")
        assert "Resuming operations" not in low.child.log.read_text()  # it waited while the high one acted
        high.stop()  # a clean exit leaves the peering; the low-priority replica takes over
        runs.create(runs.manifest("second", nodes, 1, 1))
        runs.wait_phase("second", "Running", timeout=60)
        assert "Resuming operations" in low.child.log.read_text()
        assert [p.metadata.name for p in runs.pods("second")] == ["second-worker-0"]
    finally:
        high.stop()
        low.stop()
        runs.cleanup()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
