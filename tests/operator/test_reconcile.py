"""The planner, from (run, status, observed pods, now) to actions: no cluster needed."""

from datetime import datetime, timedelta, timezone

import pytest

from bloomrun.operator import desired
from bloomrun.operator.reconcile import PodView, parallel_layout, plan
from bloomrun.operator.spec import BloomRunStatus

from .conftest import make_run

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)


def pod(run, index, phase="Running", node="a100-80gb-0", uid=None, **kw):
    return PodView(name=desired.worker_name(run, index), uid=uid or f"uid-{index}", index=index,
                   template_hash=desired.template_hash(run), phase=phase, node_name=node, **kw)


def step(run, status, pods, now=T0, nodes=None):
    result = plan(run, status, pods, now, known_nodes=nodes)
    return result, result.status


def test_a_new_run_gets_its_children_and_max_workers(run):
    result, status = step(run, BloomRunStatus(), [])
    assert {o["kind"] for o in result.infra.objects} == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service", "NetworkPolicy",
                                                               "Deployment"}
    assert [c.manifest["metadata"]["name"] for c in result.creates] == [
        "ablation-worker-0", "ablation-worker-1", "ablation-worker-2"]
    assert status.phase == "Pending" and status.nodes.display == "0/3"


def test_existing_pods_are_never_created_twice(run):
    _, status = step(run, BloomRunStatus(), [])
    result, _ = step(run, status, [pod(run, 0, "Pending", node=None), pod(run, 2)])
    assert [c.manifest["metadata"]["name"] for c in result.creates] == ["ablation-worker-1"]
    assert result.infra is None  # already applied for this spec


def test_running_at_min_is_running_and_all_running_records_the_time(run):
    _, status = step(run, BloomRunStatus(), [])
    result, status = step(run, status, [pod(run, 0), pod(run, 1), pod(run, 2, "Pending", node=None,
                                                                     unschedulable="0/2 nodes are available")])
    assert status.phase == "Running" and status.nodes.display == "2/3" and status.running_time is None
    result, status = step(run, status, [pod(run, i) for i in range(3)])
    assert status.running_time is not None and result.became_running
    running = next(c for c in status.conditions if c.type == "Running")
    assert running.status == "True" and running.observed_generation == 1


def test_below_min_waits_in_pending_with_the_schedulers_reason(run):
    _, status = step(run, BloomRunStatus(), [])
    reason = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    pods = [pod(run, 0)] + [pod(run, i, "Pending", node=None, unschedulable=reason) for i in (1, 2)]
    _, status = step(run, status, pods)
    assert status.phase == "Pending" and reason in status.message
    scheduled = next(c for c in status.conditions if c.type == "Scheduled")
    assert scheduled.status == "False" and scheduled.reason == "Unschedulable" and reason in scheduled.message


def test_a_retryable_failure_is_counted_once_and_replaced_after_backoff(run):
    _, status = step(run, BloomRunStatus(), [])
    _, status = step(run, status, [pod(run, 0), pod(run, 1, uid="dead-1"), pod(run, 2)])
    failed = pod(run, 1, "Failed", exit_code=137, uid="dead-1")  # the same pod, now failed
    pods = [pod(run, 0), failed, pod(run, 2)]
    result, status = step(run, status, pods, now=T0 + timedelta(seconds=5))
    assert status.restarts == 1 and status.restarts_by_reason == {"RetryableExitCode": 1}
    assert [(d.name, d.uid) for d in result.deletes] == [("ablation-worker-1", "dead-1")]
    assert result.restart_reasons == ["RetryableExitCode"] and not result.creates
    assert any(e.reason == "WorkerFailed" for e in result.events)
    # The same observation again (a retry, or a stale cache): no second count.
    result, status = step(run, status, pods, now=T0 + timedelta(seconds=6))
    assert status.restarts == 1 and result.deletes[0].uid == "dead-1"
    # Once the pod is gone and the backoff (10 s) passed, the worker comes back.
    result, _ = step(run, status, [pod(run, 0), pod(run, 2)], now=T0 + timedelta(seconds=7))
    assert not result.creates and 7 < result.requeue_after <= 8
    result, status = step(run, status, [pod(run, 0), pod(run, 2)], now=T0 + timedelta(seconds=16))
    assert [c.manifest["metadata"]["name"] for c in result.creates] == ["ablation-worker-1"]


def test_backoff_doubles_with_each_restart():
    run = make_run(restartPolicy={"backoffSeconds": 4, "maxRestarts": 10})
    status = BloomRunStatus(phase="Running")
    delays = []
    for n in range(3):
        result, status = step(run, status, [pod(run, 0, "Failed", exit_code=143, uid=f"f{n}")], now=T0)
        delays.append(result.requeue_after)
    assert delays == [4, 8, 16]


def test_a_permanent_exit_code_fails_the_run_and_stops_the_others(run):
    _, status = step(run, BloomRunStatus(), [])
    refused = "permanent: /data/oscar_text_document.bin: no such file"  # the trainer's termination message
    pods = [pod(run, 0), pod(run, 1, "Failed", exit_code=1, message=refused), pod(run, 2)]
    result, status = step(run, status, pods)
    assert status.phase == "Failed" and status.restarts == 0
    assert "exit code 1" in status.message and status.last_failure.message == refused
    assert {d.name for d in result.deletes} == {"ablation-worker-0", "ablation-worker-1", "ablation-worker-2"}
    assert not result.creates
    # Terminal: nothing is recreated afterwards.
    result, status = step(run, status, [])
    assert status.phase == "Failed" and not result.creates


def test_oom_eviction_and_node_loss_are_classified_and_retryable(run):
    _, status = step(run, BloomRunStatus(), [])
    pods = [pod(run, 0, "Failed", reason="OOMKilled", exit_code=137, uid="a"),
            pod(run, 1, "Failed", reason="Evicted", exit_code=137, uid="b"),
            pod(run, 2, "Running", node="gone-node", uid="c")]
    result, status = step(run, status, pods, nodes={"a100-80gb-0"})
    assert status.restarts_by_reason == {"OOMKilled": 1, "Evicted": 1, "NodeLost": 1}
    lost = next(d for d in result.deletes if d.uid == "c")
    assert lost.force  # no kubelet is left to confirm a graceful stop


def test_a_container_lost_with_its_machine_is_a_lost_node_not_a_permanent_exit(run):
    """The pod as the kubelet reports it once a lost machine returns: containerd, restarted,
    finds the container's task gone and says exit code 255, reason "Unknown"; the kubelet
    fills the message with the log's tail. Exit code 255 alone would be permanent."""
    body = {"metadata": {"name": desired.worker_name(run, 1), "uid": "lost",
                         "labels": {desired.INDEX_LABEL: "1", desired.HASH_LABEL: desired.template_hash(run)}},
            "spec": {"nodeName": "a100-80gb-1"},
            "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                "exitCode": 255, "reason": "Unknown",
                "message": "[rank 1] INFO bloomrun.trainer.watchdog: watching ranks 1-1\n"}}}]}}
    _, status = step(run, BloomRunStatus(phase="Running"), [pod(run, 0), PodView.from_body(body)])
    assert status.phase != "Failed" and status.restarts_by_reason == {"NodeLost": 1}
    unknown = {**body, "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {
        "terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown"}}}]}}
    _, status = step(run, BloomRunStatus(phase="Running"), [pod(run, 0), PodView.from_body(unknown)])
    assert status.restarts_by_reason == {"NodeLost": 1}


def test_max_restarts_exhausted_fails_the_run():
    run = make_run(restartPolicy={"maxRestarts": 1, "backoffSeconds": 0})
    result, status = step(run, BloomRunStatus(phase="Running"), [pod(run, 0, "Failed", exit_code=137, uid="x")])
    assert status.restarts == 1 and status.phase == "Restarting"
    result, status = step(run, status, [pod(run, 0, "Failed", exit_code=137, uid="y")])
    assert status.phase == "Failed" and status.restarts == 2
    failed = next(c for c in status.conditions if c.type == "Failed")
    assert failed.status == "True" and failed.reason == "RestartLimitExceeded"


def test_a_worker_exiting_zero_means_training_is_complete(run):
    result, status = step(run, BloomRunStatus(phase="Running"), [pod(run, 0, "Succeeded", exit_code=0), pod(run, 1)])
    assert status.phase == "Succeeded" and status.completion_time
    assert not result.creates and not result.deletes  # the others finish by themselves


def test_suspend_deletes_workers_and_resume_recreates_them():
    run = make_run(suspend=True, nodes={"min": 1, "max": 2})
    result, status = step(run, BloomRunStatus(phase="Running"), [pod(run, 0), pod(run, 1)])
    assert status.phase == "Suspended" and {d.reason for d in result.deletes} == {"Suspended"}
    assert not result.creates and status.restarts == 0
    resumed = make_run(suspend=False, nodes={"min": 1, "max": 2}, generation=2)
    result, status = step(resumed, status, [])
    assert len(result.creates) == 2 and status.phase == "Pending"


def test_gpu_hours_are_integrated_over_running_workers():
    run = make_run(gpusPerNode=8, nodes={"min": 2, "max": 2})
    _, status = step(run, BloomRunStatus(), [])
    _, status = step(run, status, [pod(run, 0), pod(run, 1)], now=T0)
    _, status = step(run, status, [pod(run, 0), pod(run, 1)], now=T0 + timedelta(minutes=30))
    assert abs(status.gpu_hours.used - 2 * 8 * 0.5) < 1e-6


def test_an_operator_outage_is_charged_from_what_the_pods_did_not_at_the_last_size():
    """Both 8-GPU workers ran when the operator went down and failed a minute later; it comes
    back an hour later: 2 x 8 GPUs x 1 min, not 16 GPU-hours (issue 19)."""
    run = make_run(gpusPerNode=8, nodes={"min": 2, "max": 2})
    started = T0 - timedelta(hours=1)
    _, status = step(run, BloomRunStatus(), [pod(run, i, started_at=started) for i in range(2)], now=T0)
    assert status.nodes.ready == 2
    failed = [pod(run, i, "Failed", exit_code=1, started_at=started, finished_at=T0 + timedelta(minutes=1))
              for i in range(2)]
    _, status = step(run, status, failed, now=T0 + timedelta(hours=1))
    assert status.gpu_hours.used == round(2 * 8 / 60, 6)
    assert sum(getattr(status.goodput, b) for b in ("productive", "lost", "restart", "checkpoint", "scheduling",
                                                        "other")) == pytest.approx(2 * 8 / 60, abs=1e-5)
    # A worker that started during the interval is charged from its start, one still deleting
    # until it ends; a watched worker gone without a trace for the whole interval.
    _, status = step(run, BloomRunStatus(), [pod(run, 0, started_at=started), pod(run, 1, started_at=started)], now=T0)
    later = [pod(run, 0, uid="uid-8", started_at=T0 + timedelta(minutes=30)),
             pod(run, 1, "Failed", deleting=True, uid="uid-9", started_at=T0 + timedelta(minutes=10),
                 finished_at=T0 + timedelta(minutes=20))]
    _, status = step(run, status, later, now=T0 + timedelta(hours=1))
    minutes = 30 + 10 + 60 + 60  # worker-0 anew, the deleting one, the two watched ones now gone
    assert status.gpu_hours.used == pytest.approx(8 * minutes / 60, abs=1e-5)


def test_the_gpu_hour_budget_stops_the_run_cleanly_and_it_succeeds():
    run = make_run(gpusPerNode=8, nodes={"min": 1, "max": 1}, budget={"gpuHours": 4})
    status = BloomRunStatus(phase="Running")
    _, status = step(run, status, [pod(run, 0)], now=T0)
    result, status = step(run, status, [pod(run, 0)], now=T0 + timedelta(minutes=31))
    assert status.stopping == "GPUHourBudgetSpent"
    assert [d.reason for d in result.deletes] == ["GPUHourBudgetSpent"] and not result.deletes[0].force
    # The trainer checkpoints on SIGTERM and exits 0 (or 143 while the pod is deleting):
    # neither is a failure, and nothing is recreated.
    result, status = step(run, status, [pod(run, 0, "Failed", exit_code=143, deleting=True)], now=T0 + timedelta(minutes=32))
    assert status.restarts == 0 and not result.creates
    result, status = step(run, status, [], now=T0 + timedelta(minutes=33))
    assert status.phase == "Succeeded" and status.restarts == 0
    assert next(c for c in status.conditions if c.type == "Succeeded").reason == "GPUHourBudgetSpent"


def test_a_spec_change_replaces_stale_workers_without_counting_a_restart():
    old, new = make_run(image="trainer:1"), make_run(image="trainer:2", generation=2)
    stale = pod(old, 0)
    result, status = step(new, BloomRunStatus(phase="Running"), [stale])
    assert [d.reason for d in result.deletes] == ["SpecChanged"] and status.restarts == 0
    assert result.infra is not None  # the ConfigMap follows the spec too


def test_unchanged_observations_write_no_status(run):
    pods = [pod(run, i) for i in range(3)]
    _, status = step(run, BloomRunStatus(), pods)
    result, _ = step(run, status, pods, now=T0 + timedelta(seconds=20))
    assert not result.status_changed and not result.creates and not result.deletes and not result.events
    result, _ = step(run, status, pods, now=T0 + timedelta(seconds=61))
    assert result.status_changed  # GPU-hour accounting is written once a minute


def test_pod_view_reads_kubelet_statuses():
    body = {"metadata": {"name": "r-worker-1", "uid": "u", "labels": {desired.INDEX_LABEL: "1"}},
            "spec": {"nodeName": "n1"},
            "status": {"phase": "Failed", "containerStatuses": [
                {"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}
    view = PodView.from_body(body)
    assert (view.index, view.phase, view.exit_code, view.reason) == (1, "Failed", 137, "OOMKilled")
    pending = {"metadata": {"name": "p", "labels": {desired.INDEX_LABEL: "0"}}, "status": {
        "phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                            "message": "0/3 nodes are available"}]}}
    assert PodView.from_body(pending).unschedulable == "0/3 nodes are available"
    # What the GPU-hours are charged from: the first container's start, the last one's end.
    times = {"metadata": {"name": "t", "labels": {desired.INDEX_LABEL: "0"}}, "status": {
        "phase": "Running", "containerStatuses": [
            {"name": "trainer", "state": {"running": {"startedAt": "2026-11-26T12:00:05Z"}}},
            {"name": "side", "state": {"terminated": {"startedAt": "2026-11-26T12:00:01Z",
                                                      "finishedAt": "2026-11-26T12:30:00Z", "exitCode": 0}}}]}}
    view = PodView.from_body(times)
    assert view.started_at == T0 + timedelta(seconds=1) and view.finished_at is None  # one still runs
    times["status"]["containerStatuses"][0]["state"] = {"terminated": {
        "startedAt": "2026-11-26T12:00:05Z", "finishedAt": "2026-11-26T13:00:00Z", "exitCode": 1}}
    assert PodView.from_body(times).finished_at == T0 + timedelta(hours=1)


def test_an_invalid_spec_fails_the_run_until_it_is_fixed(run):
    from bloomrun.operator.reconcile import INVALID_SPEC, refuse

    status = refuse(BloomRunStatus(), "spec.model: hiddenSize (66) must be divisible", INVALID_SPEC, 1, T0)
    assert status.phase == "Failed" and "hiddenSize" in status.message
    result, status = step(run, status, [])
    assert status.phase == "Pending" and len(result.creates) == 3


def test_pods_of_an_earlier_run_with_the_same_name_are_not_adopted(run):
    old = PodView(name="ablation-worker-0", uid="old", index=0, template_hash="x", phase="Failed",
                  exit_code=1, owner_uid="previous-run-uid")
    result, status = step(run, BloomRunStatus(), [old])
    assert status.phase != "Failed" and status.restarts == 0 and not result.deletes


def test_an_unschedulable_worker_0_waits_like_any_other(run):
    """No worker hosts the rendezvous (its store runs apart): worker-0 waiting for a node
    moves nobody, the others go on training."""
    _, status = step(run, BloomRunStatus(), [])
    waiting = pod(run, 0, "Pending", node=None, unschedulable="0/3 nodes are available", uid="new-0")
    result, status = step(run, status, [waiting, pod(run, 1), pod(run, 2)])
    assert not result.deletes and status.restarts == 0


# ------------------------------------------------------- children deleted by hand


def test_a_child_deleted_by_hand_is_applied_again_on_the_next_reconcile(run):
    result, status = step(run, BloomRunStatus(), [])
    every = {(o["kind"], o["metadata"]["name"]) for o in result.infra.objects}
    pods = [pod(run, i) for i in range(3)]
    later = T0 + timedelta(seconds=30)
    # All there: nothing to apply (the steady state costs no apply call).
    assert plan(run, status, pods, later, observed_infra=every).infra is None
    # Someone deleted the ConfigMap and the headless Service: same spec, yet re-applied.
    gone = every - {("ConfigMap", "ablation-config"), ("Service", "ablation")}
    result = plan(run, status, pods, later, observed_infra=gone)
    assert result.infra is not None
    assert {(o["kind"], o["metadata"]["name"]) for o in result.infra.objects} == every
    assert any(e.reason == "ChildrenRecreated" and "ConfigMap ablation-config" in e.message for e in result.events)
    assert result.status_changed and result.status.infra_applied_at == "2026-11-26T12:00:30Z"


def test_children_just_applied_but_not_yet_watched_are_not_applied_twice(run):
    _, status = step(run, BloomRunStatus(), [])
    soon = T0 + timedelta(seconds=1)  # the watch lags the apply by a moment
    assert plan(run, status, [], soon, observed_infra=set()).infra is None
    assert plan(run, status, [], T0 + timedelta(seconds=30), observed_infra=None).infra is None  # unknown


# ------------------------------------------------ pods lost while nobody watched


def test_a_pod_gone_while_the_operator_was_down_is_counted_once_and_replaced(run):
    _, status = step(run, BloomRunStatus(), [])
    _, status = step(run, status, [pod(run, i) for i in range(3)])
    assert [w.uid for w in status.workers] == ["uid-0", "uid-1", "uid-2"]
    survivors = [pod(run, 0), pod(run, 2)]  # worker-1 vanished without a trace
    result, status = step(run, status, survivors, now=T0 + timedelta(seconds=5))
    assert status.restarts == 1 and status.restarts_by_reason == {"PodLost": 1}
    assert status.last_failure.pod == "ablation-worker-1" and result.restart_reasons == ["PodLost"]
    assert [w.uid for w in status.workers] == ["uid-0", "uid-2"]
    # The same observation again: no second count; the backoff (10 s) then the replacement.
    result, status = step(run, status, survivors, now=T0 + timedelta(seconds=6))
    assert status.restarts == 1 and not result.creates
    result, status = step(run, status, survivors, now=T0 + timedelta(seconds=16))
    assert [c.manifest["metadata"]["name"] for c in result.creates] == ["ablation-worker-1"]
    assert status.restarts == 1


def test_a_pod_someone_else_is_deleting_counts_once_it_is_gone(run):
    _, status = step(run, BloomRunStatus(), [])
    _, status = step(run, status, [pod(run, i) for i in range(3)])
    _, status = step(run, status, [pod(run, 0), pod(run, 1, deleting=True), pod(run, 2)])
    assert status.restarts == 0 and "uid-1" in [w.uid for w in status.workers]
    _, status = step(run, status, [pod(run, 0), pod(run, 2)])
    assert status.restarts_by_reason == {"PodLost": 1}


def test_a_worker_stuck_terminating_on_a_node_not_ready_is_forced_out_counted_once_and_replaced():
    """Evicted from a NotReady node, worker-1 stays Terminating: no kubelet confirms it, and its
    name blocks the replacement (issue 19 kept such a run at 1/2 for 10 simulated hours)."""
    from bloomrun.operator.reconcile import STUCK_TERMINATING_S, node_unready_since

    run = make_run(nodes={"min": 1, "max": 2}, restartPolicy={"backoffSeconds": 0})
    bound = timedelta(seconds=STUCK_TERMINATING_S)
    _, status = step(run, BloomRunStatus(), [pod(run, 0, node="n0"), pod(run, 1, node="n1")])
    deadline = T0 + timedelta(minutes=5)  # evicted at T0 with a 5-minute grace
    stuck = [pod(run, 0, node="n0"), pod(run, 1, node="n1", deleting=True, deletion_deadline=deadline)]
    unready = {"n1": T0 - timedelta(minutes=5)}

    def at(moment, unready_since):
        result = plan(run, status, stuck, moment, unready_since=unready_since)
        return result, result.status

    result, waiting = at(deadline + bound - timedelta(seconds=1), unready)
    assert not result.deletes and not result.creates and waiting.nodes.display == "1/2"
    result, _ = at(deadline + timedelta(hours=10), {})  # its node Ready: the kubelet will finish it
    assert not result.deletes and not result.creates
    result, status = at(deadline + bound, unready)
    assert [(d.name, d.reason, d.force) for d in result.deletes] == [("ablation-worker-1", "NodeLost", True)]
    assert status.restarts_by_reason == {"NodeLost": 1} and "uid-1" in status.handled_failures
    assert "WorkerForceDeleted" in [e.reason for e in result.events]
    result, status = step(run, status, [pod(run, 0, node="n0")], now=deadline + bound + timedelta(seconds=5))
    assert [c.manifest["metadata"]["name"] for c in result.creates] == ["ablation-worker-1"]
    assert status.restarts == 1  # the force-deleted worker is not counted again once gone
    # The node's own say: Ready, or not Ready since its condition last changed.
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    lost = {"status": {"conditions": [{"type": "Ready", "status": "Unknown", "lastTransitionTime": "2026-11-26T12:00:00Z"}]}}
    assert node_unready_since(ready, T0) is None and node_unready_since(lost, T0 + bound) == T0


def test_pods_the_operator_deleted_are_never_counted_when_gone():
    run = make_run(nodes={"min": 1, "max": 2})
    _, status = step(run, BloomRunStatus(), [])
    _, status = step(run, status, [pod(run, 0), pod(run, 1)])
    # Scale-down: worker-1 is ours to delete.
    smaller = make_run(nodes={"min": 1, "max": 1}, generation=2)
    result, status = step(smaller, status, [pod(smaller, 0, uid="uid-0"), pod(smaller, 1, uid="uid-1")])
    assert [d.reason for d in result.deletes] == ["ScaledDown"] and [w.uid for w in status.workers] == ["uid-0"]
    _, status = step(smaller, status, [pod(smaller, 0, uid="uid-0")])
    # Suspend: both deletions ours, then the pods are gone.
    suspended = make_run(nodes={"min": 1, "max": 1}, suspend=True, generation=3)
    result, status = step(suspended, status, [pod(suspended, 0, uid="uid-0")])
    assert [d.reason for d in result.deletes] == ["Suspended"] and not status.workers
    _, status = step(suspended, status, [])
    # A failure: counted as what it was, and not again as a loss when it is gone.
    resumed = make_run(nodes={"min": 1, "max": 1}, generation=4)
    _, status = step(resumed, status, [pod(resumed, 0, uid="new-0")])
    _, status = step(resumed, status, [pod(resumed, 0, "Failed", exit_code=137, uid="new-0")])
    _, status = step(resumed, status, [], now=T0 + timedelta(seconds=1))
    assert status.restarts == 1 and status.restarts_by_reason == {"RetryableExitCode": 1}


def test_a_pod_deleted_for_the_gpu_hour_budget_is_not_a_loss():
    run = make_run(nodes={"min": 1, "max": 1}, budget={"gpuHours": 0.01})
    _, status = step(run, BloomRunStatus(), [])
    _, status = step(run, status, [pod(run, 0)])
    result, status = step(run, status, [pod(run, 0)], now=T0 + timedelta(minutes=10))
    assert status.stopping == "GPUHourBudgetSpent" and [d.uid for d in result.deletes] == ["uid-0"]
    _, status = step(run, status, [], now=T0 + timedelta(minutes=11))
    assert status.restarts == 0 and status.phase == "Succeeded"


def test_malformed_timestamps_in_status_cost_only_that_value(run):
    """Status is writable by others than the operator; a bad timestamp must not make every
    reconcile of the run raise."""
    status = BloomRunStatus.model_validate({
        "phase": "Running", "backoffUntil": "soon", "startTime": "yesterday", "runningTime": "2026-13-45",
        "gpuHours": {"used": 1.5, "accountedAt": "not a time"}, "infraAppliedAt": "??"})
    result, status = step(run, status, [])
    assert len(result.creates) == 3 and status.gpu_hours.used >= 1.5


def test_torchrun_giving_up_without_a_permanent_verdict_is_retried(run):
    """torchrun exits 1 whenever its workers fail for good, a lost peer or an NCCL timeout
    included: that is retried with backoff, not taken for a bad config."""
    _, status = step(run, BloomRunStatus(), [])
    crashed = pod(run, 1, "Failed", exit_code=1, message="RuntimeError: [c10d] Connection reset by peer")
    result, status = step(run, status, [pod(run, 0), crashed, pod(run, 2)])
    assert status.phase != "Failed" and status.restarts == 1
    assert status.last_failure.reason == "RetryableExitCode" and "Connection reset" in status.last_failure.message


def test_the_layout_follows_the_elastic_world_in_whole_data_parallel_replicas():
    """tensor x pipeline stay as specified; the data-parallel degree is the running ranks /
    (tensor x pipeline), and 0 below nodes.min, where no world has formed."""
    run = make_run(parallel={"tensor": 2, "pipeline": 2}, nodes={"min": 2, "max": 3}, gpusPerNode=8,
                   training={"trainSteps": 20, "globalBatchSize": 48, "microBatchSize": 1, "zeroStage": 1})
    _, status = step(run, BloomRunStatus(), [])
    assert status.layout.model_dump() == {"tensor": 2, "pipeline": 2, "data": 0, "display": "2x2x0"}
    _, status = step(run, status, [pod(run, i) for i in range(3)])
    assert (status.layout.data, status.layout.display) == (6, "2x2x6")  # 24 ranks / 4
    _, status = step(run, status, [pod(run, 0), pod(run, 2), pod(run, 1, "Pending", node=None)])
    assert (status.layout.data, status.layout.display) == (4, "2x2x4")  # a node lost: 16 ranks / 4
    _, status = step(run, status, [pod(run, 0)])
    assert status.layout.data == 0


def test_the_layout_of_the_final_model_and_of_a_cpu_run():
    """BLOOM-176B's 4 x 12 on 48 nodes of 8 is 8 data-parallel replicas; a CPU run
    (gpusPerNode 0) has one rank per node."""
    bloom = make_run(model={"preset": "176b"}, parallel={"tensor": 4, "pipeline": 12}, nodes={"min": 48, "max": 48},
                     gpusPerNode=8, training={"trainSteps": 20, "globalBatchSize": 48, "microBatchSize": 1,
                                              "zeroStage": 1})
    assert parallel_layout(bloom.spec, 48).display == "4x12x8"
    assert parallel_layout(bloom.spec, 47).data == 0
    cpu = make_run(parallel={"pipeline": 2}, nodes={"min": 4, "max": 4}, gpusPerNode=0,
                   training={"trainSteps": 20, "globalBatchSize": 48, "microBatchSize": 1, "zeroStage": 1})
    assert parallel_layout(cpu.spec, 4).model_dump() == {"tensor": 1, "pipeline": 2, "data": 2, "display": "1x2x2"}
