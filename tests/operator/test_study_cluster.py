"""A BloomStudy on the real control plane: its arms' BloomRuns, concurrency, the budget split,
a permanently failed arm, the status table and `kubectl get bs`.

Worker pods are run by kwok; the tests end them with the cluster's fault levers (as the run
e2e tests do) and watch the operator move the study along.
"""

from __future__ import annotations

import copy

import pytest

from bloomrun.operator.spec import GROUP, PLURAL, VERSION
from bloomrun.study.spec import ARM_LABEL, PLURAL as STUDY_PLURAL, STUDY_LABEL, budget_shares, parse_study

from .e2e import BASE_SPEC, Operator, Runs, install_crds, wait_for

pytestmark = [pytest.mark.cluster]

SEQ = 64  # the tiny preset's sequence length
COMPARE_AT = 50 * BASE_SPEC["training"]["globalBatchSize"] * SEQ  # 50 of the base run's 100 steps


@pytest.fixture(scope="module")
def crd(cluster):
    install_crds(cluster)


@pytest.fixture(scope="module")
def operator(cluster, crd):
    op = Operator(cluster, "--standalone", "--namespace", "bs-*")
    yield op
    op.stop()


@pytest.fixture
def runs(cluster, crd):
    namespace = cluster.new_namespace("bs", pod_security="restricted")
    handle = Runs(cluster, namespace)
    yield handle
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    handle.cleanup()


def study_manifest(runs: Runs, nodes: list[str], max_concurrent: int) -> dict:
    base = runs.manifest("unused", nodes, 1, 1)["spec"]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "BloomStudy",
            "metadata": {"name": "pos", "namespace": runs.namespace},
            "spec": {"base": copy.deepcopy(base), "compareAtTokens": COMPARE_AT, "maxConcurrent": max_concurrent,
                     "budget": {"gpuHours": 1.0}, "eval": {"tasks": ["bloomrun_arithmetic"]},
                     "arms": [{"name": "alibi", "patch": {"model": {"position": "alibi"}}},
                              {"name": "rotary", "patch": {"model": {"position": "rotary"}}},
                              {"name": "none", "patch": {"model": {"position": "none"}}}]}}


# The operator's first reconcile of a new study waits for kopf to see the namespace, add its
# finalizer and start the study's loop; CI (2 cores, the whole suite's processes) once took
# over 30 s for that, so the operator-driven waits get 90 s and say what the operator logged.
OPERATOR_S = 90


def until(operator: Operator, predicate, what: str):
    try:
        return wait_for(predicate, OPERATOR_S, what)
    except TimeoutError as err:
        raise AssertionError(f"{err}\noperator log (tail):\n{operator.child.log_tail(60)}") from None


def arm_runs(runs: Runs) -> dict[str, dict]:
    listed = runs.custom.list_namespaced_custom_object(GROUP, VERSION, runs.namespace, PLURAL,
                                                       label_selector=f"{STUDY_LABEL}=pos")
    return {run["metadata"]["labels"][ARM_LABEL]: run for run in listed["items"]}


def study_status(runs: Runs) -> dict:
    return runs.custom.get_namespaced_custom_object(GROUP, VERSION, runs.namespace, STUDY_PLURAL,
                                                    "pos").get("status") or {}


def test_a_study_runs_its_arms_within_concurrency_and_survives_a_failed_arm(runs, operator, cluster):
    nodes = runs.add_nodes(2)
    manifest = study_manifest(runs, nodes, max_concurrent=2)
    created = runs.custom.create_namespaced_custom_object(GROUP, VERSION, runs.namespace, STUDY_PLURAL,
                                                          manifest, field_validation="Strict")
    shares = budget_shares(parse_study(manifest).spec)

    # Two arms at once, each owned by the study, labelled, trained to the comparison point
    # within its share of the budget; the third waits for a slot.
    first = until(operator, lambda: (lambda r: r if len(r) == 2 else None)(arm_runs(runs)), "two arm runs")
    assert set(first) == {"alibi", "rotary"}
    for arm, run in first.items():
        assert run["metadata"]["name"] == f"pos-{arm}"
        owner = run["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("BloomStudy", created["metadata"]["uid"], True)
        assert run["spec"]["training"]["trainTokens"] == COMPARE_AT
        assert run["spec"]["budget"]["gpuHours"] == pytest.approx(shares[arm])
        assert run["spec"]["model"]["position"] == arm
    runs.wait_phase("pos-alibi", "Running")
    runs.wait_phase("pos-rotary", "Running")
    assert set(arm_runs(runs)) == {"alibi", "rotary"}

    # A permanent failure: the study is Degraded, the slot goes to the third arm.
    cluster.fail_pod(runs.namespace, "pos-alibi-worker-0", exit_code=2)
    runs.wait_phase("pos-alibi", "Failed")
    status = until(operator, lambda: (lambda s: s if any(c["type"] == "Degraded" and c["status"] == "True"
                                                         for c in s.get("conditions", [])) else None)(study_status(runs)),
                   "the study Degraded")
    assert "alibi" in next(c for c in status["conditions"] if c["type"] == "Degraded")["message"]
    until(operator, lambda: "none" in arm_runs(runs) or None, "the third arm created")
    runs.wait_phase("pos-none", "Running")

    # The other arms finish; the table has every arm.
    for arm in ("rotary", "none"):
        cluster.succeed_pod(runs.namespace, f"pos-{arm}-worker-0")
        runs.wait_phase(f"pos-{arm}", "Succeeded")
    status = until(operator, lambda: (lambda s: s if [a["phase"] for a in s.get("arms", [])] == ["Failed", "Trained", "Trained"]
                                      else None)(study_status(runs)), "every arm's row")
    assert status["armCount"] == 3 and [a["run"] for a in status["arms"]] == ["pos-alibi", "pos-rotary", "pos-none"]
    assert all(a["gpuHours"] is not None and a["estimatedGpuHours"] > 0 for a in status["arms"])
    events = {e.reason for e in runs.core.list_namespaced_event(runs.namespace).items
              if e.involved_object.kind == "BloomStudy"}
    assert {"ArmCreated", "ArmFailed"} <= events

    table = cluster.kubectl("get", "bs", "-n", runs.namespace).stdout
    header = table.splitlines()[0].split()
    assert header == ["NAME", "ARMS", "DONE", "BEST", "GPU-HOURS", "AGE"]
    assert table.splitlines()[1].split()[:3] == ["pos", "3", "0"]


def test_deleting_a_study_deletes_its_runs_and_suspend_reaches_them(runs, operator, cluster):
    nodes = runs.add_nodes(1)
    manifest = study_manifest(runs, nodes, max_concurrent=1)
    runs.custom.create_namespaced_custom_object(GROUP, VERSION, runs.namespace, STUDY_PLURAL, manifest)
    until(operator, lambda: "alibi" in arm_runs(runs) or None, "the first arm")
    runs.custom.patch_namespaced_custom_object(GROUP, VERSION, runs.namespace, STUDY_PLURAL, "pos",
                                               {"spec": {"suspend": True}})
    until(operator, lambda: arm_runs(runs)["alibi"]["spec"].get("suspend") is True or None, "the arm suspended")
    runs.custom.delete_namespaced_custom_object(GROUP, VERSION, runs.namespace, STUDY_PLURAL, "pos",
                                                propagation_policy="Foreground")
    wait_for(lambda: not arm_runs(runs) or None, 60, "the garbage collector to remove the arms' runs")
