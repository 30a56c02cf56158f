"""The controller's execution order against a fake API: status first, nothing after a conflict."""

import asyncio
import copy

import kopf

from bloomrun.operator import desired
from bloomrun.operator.controller import Controller
from bloomrun.operator.kube import Conflict, ForeignObject, LeftoverChild, NamespaceTerminating
from bloomrun.operator.metrics import OperatorMetrics
from bloomrun.operator.reconcile import PodView

from .conftest import manifest


class FakeKube:
    def __init__(self, body, conflict=False):
        self.body, self.conflict, self.calls = body, conflict, []

    def get_run(self, namespace, name):
        return copy.deepcopy(self.body)

    def apply_owned(self, obj, owner_uid):
        self.calls.append(("apply", obj["kind"]))

    def patch_run_status(self, namespace, name, resource_version, status):
        self.calls.append(("status", resource_version))
        if self.conflict:
            raise Conflict(409, "the object has been modified")
        self.body["status"] = status

    def delete_pod(self, namespace, name, uid, force=False):
        self.calls.append(("delete", name))

    def create_pod(self, manifest):
        self.calls.append(("create", manifest["metadata"]["name"]))
        return True

    def post_event(self, body, type_, reason, message):
        self.calls.append(("event", reason))

    def node_exists(self, name):
        return False


def run_body():
    body = manifest(nodes={"min": 1, "max": 2})
    body["metadata"] |= {"uid": "uid-1", "generation": 1, "resourceVersion": "41",
                         "creationTimestamp": "2026-11-26T12:00:00Z"}
    return body


def controller_for(kube, pods=(), infra=None):
    return Controller(kube, OperatorMetrics(), pods=lambda ns, name: list(pods), infra=infra,
                      nodes=lambda: {"node-a"})


def test_children_then_status_then_pods_then_events():
    kube = FakeKube(run_body())
    controller_for(kube).reconcile("team-a", "ablation")
    kinds = [c[0] for c in kube.calls]
    assert kinds[:7] == ["apply"] * 7
    assert kinds[7] == "status" and kube.calls[7][1] == "41"  # conditional on what was read
    assert [c for c in kube.calls if c[0] == "create"] == [("create", "ablation-worker-0"), ("create", "ablation-worker-1")]
    assert kinds.index("event") > kinds.index("create")


def test_a_conflict_stops_before_any_pod_is_touched():
    body = run_body()
    body["status"] = {"phase": "Running", "nodes": {"desired": 2, "ready": 2, "display": "2/2"}}
    failed = PodView(name="ablation-worker-1", uid="dead", index=1, template_hash="", phase="Failed",
                     exit_code=137, node_name="node-a", owner_uid="uid-1")
    kube = FakeKube(body, conflict=True)
    controller = controller_for(kube, [failed])
    controller.requeue = lambda *args: None
    controller.reconcile("team-a", "ablation")
    assert [c[0] for c in kube.calls if c[0] != "apply"] == ["status"]


def test_a_pod_on_a_node_missing_from_the_index_is_checked_before_calling_it_lost():
    body = run_body()
    pod = PodView(name="ablation-worker-0", uid="u0", index=0, phase="Running", node_name="brand-new-node",
                  template_hash=desired.template_hash(desired.Run.from_body(body)), owner_uid="uid-1")
    kube = FakeKube(body)
    kube.node_exists = lambda name: name == "brand-new-node"
    controller_for(kube, [pod]).reconcile("team-a", "ablation")
    assert ("delete", "ablation-worker-0") not in kube.calls
    assert kube.body["status"]["restarts"] == 0


def test_children_are_applied_again_only_when_the_watches_miss_one():
    kube = FakeKube(run_body())
    existing = set(desired.infra_names(desired.Run.from_body(kube.body)))
    controller = controller_for(kube, infra=lambda ns, name: existing)
    controller.reconcile("team-a", "ablation")
    kube.body["status"]["infraAppliedAt"] = "2026-01-01T00:00:00Z"  # long settled
    kube.calls.clear()
    controller.reconcile("team-a", "ablation")
    assert not [c for c in kube.calls if c[0] == "apply"]  # the steady state: no apply call
    existing.discard(("ConfigMap", "ablation-config"))
    controller.reconcile("team-a", "ablation")
    assert [c for c in kube.calls if c[0] == "apply"] == [("apply", k) for k in (
        "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service", "NetworkPolicy", "Deployment")]


def test_a_namespace_being_deleted_ends_the_reconcile_quietly():
    class Terminating(FakeKube):
        def apply_owned(self, obj, owner_uid):
            raise NamespaceTerminating(403, "unable to create new content in namespace team-a "
                                            "because it is being terminated")
    kube = Terminating(run_body())
    controller_for(kube).reconcile("team-a", "ablation")  # no exception, nothing else attempted
    assert kube.calls == []
    assert NamespaceTerminating.matches(403, "... because it is being terminated")
    assert not NamespaceTerminating.matches(403, 'pods is forbidden: User "x" cannot create')


def test_a_child_name_taken_by_a_foreign_object_fails_the_run_and_creates_nothing():
    class Taken(FakeKube):
        def apply_owned(self, obj, owner_uid):
            assert owner_uid == "uid-1"
            if obj["kind"] == "ServiceAccount":
                raise ForeignObject("ServiceAccount", "team-a", obj["metadata"]["name"])
            super().apply_owned(obj, owner_uid)
    kube = Taken(run_body())
    controller_for(kube).reconcile("team-a", "ablation")
    status = kube.body["status"]
    assert status["phase"] == "Failed" and "ServiceAccount team-a/ablation-trainer exists" in status["message"]
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Failed"] == ["ForeignChild"]
    assert not [c for c in kube.calls if c[0] in ("create", "delete")] and ("event", "ForeignChild") in kube.calls


def test_a_child_left_by_a_deleted_predecessor_is_waited_for_and_the_run_does_not_fail():
    class Leftover(FakeKube):
        def apply_owned(self, obj, owner_uid):
            raise LeftoverChild(obj["kind"], "team-a", obj["metadata"]["name"])
    kube = Leftover(run_body())
    controller = controller_for(kube)
    requeued = []
    controller.requeue = lambda namespace, name, delay: requeued.append((namespace, name, delay))
    controller.reconcile("team-a", "ablation")
    assert requeued and requeued[0][:2] == ("team-a", "ablation")
    assert kube.body.get("status", {}).get("phase") != "Failed"
    assert not [c for c in kube.calls if c[0] in ("create", "delete", "event")]


def test_exact_namespaces_turn_kopfs_cluster_wide_scanning_off():
    from bloomrun.operator.main import needs_scanning
    assert not needs_scanning(("team-a", "team-b"))  # no list/watch of CRDs or namespaces needed
    assert needs_scanning(())  # cluster-wide
    assert needs_scanning(("br-*",)) and needs_scanning(("!kube-system",))  # patterns need the namespace list


def test_a_requeue_reconciles_through_the_runs_loop_and_nowhere_else():
    """kopf cancels a run's loop (its daemon) when peering pauses the replica: from then on
    the replica's requeues, and the timer, must touch nothing."""
    kube = FakeKube(run_body())
    controller = controller_for(kube)
    controller.interval_s = 3600  # only requeues reconcile in this test

    async def scenario():
        controller.requeue("team-a", "ablation", 0)  # no loop yet: not this replica's to act on
        await asyncio.sleep(0.2)
        assert kube.calls == []
        loop = asyncio.create_task(controller.serve("team-a", "ablation"))
        await asyncio.sleep(0.05)
        controller.requeue("team-a", "ablation", 0)
        await wait_until(lambda: ("event", "Pending") in kube.calls)  # the last call of a reconcile
        loop.cancel()  # what kopf does to the daemon on a pause
        await asyncio.gather(loop, return_exceptions=True)
        kube.calls.clear()
        controller.requeue("team-a", "ablation", 0)
        await asyncio.sleep(0.2)
        assert kube.calls == []

    asyncio.run(scenario())


def test_the_loop_reconciles_every_interval_and_the_earliest_request_wins():
    kube = FakeKube(run_body())
    controller = controller_for(kube)
    controller.interval_s = 0.2
    key = ("team-a", "ablation")
    controller.schedule.attach(key, lambda: None)
    controller.requeue(*key, 30)
    controller.requeue(*key, 0.5)
    controller.requeue(*key, 60)  # later: does not postpone the reconcile due in 0.5 s
    assert controller.schedule.seconds_left(key, 3600) <= 0.5
    assert controller.schedule.seconds_left(key, 0.2) <= 0.2
    controller.schedule.detach(key)

    async def scenario():
        loop = asyncio.create_task(controller.serve(*key))
        await wait_until(lambda: sum(c[0] == "status" for c in kube.calls) >= 1, timeout=2)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)

    asyncio.run(scenario())


async def wait_until(condition, timeout=5.0):
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


def test_register_puts_every_handler_on_its_own_registry_and_schedules_with_a_daemon():
    from bloomrun.operator.main import Options, register

    registry = register(Options(timer_interval_s=2.5))
    indexes = {h.id for h in registry._indexing.get_all_handlers()}
    assert indexes == {"worker_pods", "eval_jobs"} | {f"infra_{c.kind.lower()}" for c in desired.INFRA_KINDS}
    spawning = registry._spawning.get_all_handlers()
    # No kopf timer beside the loops: one daemon for the runs, one for the studies.
    assert [type(h).__name__ for h in spawning] == ["DaemonHandler", "DaemonHandler"]
    assert not kopf.get_default_registry()._spawning.get_all_handlers()  # nothing registered at import
    # kopf's default registry logs in by itself; an explicit one must say how.
    assert "login_via_client" in {h.id for h in registry._activities.get_all_handlers()}
