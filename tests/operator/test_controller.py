"""The controller's execution order against a fake API: status first, nothing after a conflict."""

import copy

from bloomrun.operator import desired
from bloomrun.operator.controller import Controller
from bloomrun.operator.kube import Conflict, NamespaceTerminating
from bloomrun.operator.metrics import OperatorMetrics
from bloomrun.operator.reconcile import PodView

from .conftest import manifest


class FakeKube:
    def __init__(self, body, conflict=False):
        self.body, self.conflict, self.calls = body, conflict, []

    def get_run(self, namespace, name):
        return copy.deepcopy(self.body)

    def apply(self, obj):
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


def controller_for(kube, pods=()):
    controller = Controller(kube, OperatorMetrics())
    controller.pods_source = lambda ns, name: list(pods)
    controller.nodes_source = lambda: {"node-a"}
    return controller


def test_children_then_status_then_pods_then_events():
    kube = FakeKube(run_body())
    controller_for(kube).reconcile("team-a", "ablation")
    kinds = [c[0] for c in kube.calls]
    assert kinds[:5] == ["apply"] * 5
    assert kinds[5] == "status" and kube.calls[5][1] == "41"  # conditional on what was read
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
    controller = controller_for(kube)
    run = desired.Run.from_body(kube.body)
    existing = set(desired.infra_names(run))
    controller.infra_source = lambda ns, name: existing
    controller.reconcile("team-a", "ablation")
    kube.body["status"]["infraAppliedAt"] = "2026-01-01T00:00:00Z"  # long settled
    kube.calls.clear()
    controller.reconcile("team-a", "ablation")
    assert not [c for c in kube.calls if c[0] == "apply"]  # the steady state: no apply call
    existing.discard(("ConfigMap", "ablation-config"))
    controller.reconcile("team-a", "ablation")
    assert [c for c in kube.calls if c[0] == "apply"] == [("apply", k) for k in (
        "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service")]


def test_a_namespace_being_deleted_ends_the_reconcile_quietly():
    class Terminating(FakeKube):
        def apply(self, obj):
            raise NamespaceTerminating(403, "unable to create new content in namespace team-a "
                                            "because it is being terminated")
    kube = Terminating(run_body())
    controller_for(kube).reconcile("team-a", "ablation")  # no exception, nothing else attempted
    assert kube.calls == []
    assert NamespaceTerminating.matches(403, "... because it is being terminated")
    assert not NamespaceTerminating.matches(403, 'pods is forbidden: User "x" cannot create')


def test_exact_namespaces_turn_kopfs_cluster_wide_scanning_off():
    from bloomrun.operator.main import needs_scanning
    assert not needs_scanning(("team-a", "team-b"))  # no list/watch of CRDs or namespaces needed
    assert needs_scanning(())  # cluster-wide
    assert needs_scanning(("br-*",)) and needs_scanning(("!kube-system",))  # patterns need the namespace list
