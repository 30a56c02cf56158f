"""Evaluation Jobs on the real control plane: one Job per new checkpoint, none duplicated
across an operator restart, a crashed evaluation retried by the Job's backoff, bad input
failed at once, and neither ever touching training; results reach status, `kubectl get br`
and /metrics.

kwok runs no containers: the trainer's checkpoint reports are status patches (as rank 0
sends them), and the evaluation pods end through the cluster's levers with the termination
message `bloomctl eval --summary-file` writes (tests/operator/test_eval_job_command.py runs
that command for real). The Job controller, scheduler and garbage collector are real.
"""

from __future__ import annotations

import pytest
from kubernetes import client

from bloomrun.eval import message
from bloomrun.eval.runner import mean_stderr
from bloomrun.operator.spec import GROUP, PLURAL, VERSION

from .e2e import Operator, Runs, install_crds, wait_for

pytestmark = [pytest.mark.cluster]

EVAL = {"tasks": ["bloomrun_stories_order", "arc_easy"], "limit": 100, "backoffLimit": 1}


@pytest.fixture(scope="module")
def crd(cluster):
    install_crds(cluster)


@pytest.fixture(scope="module")
def operator(cluster, crd):
    op = Operator(cluster, "--standalone", "--namespace", "br-eval-*")
    yield op
    op.stop()


@pytest.fixture
def runs(cluster, crd):
    namespace = cluster.new_namespace("br-eval", pod_security="restricted")
    cluster.create_pvc(namespace, "checkpoints")
    handle = Runs(cluster, namespace)
    yield handle
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    handle.cleanup()


def start_run(runs: Runs, name: str, **eval_fields) -> None:
    """A one-node run with eval set, on two nodes of its own: one for the worker, one for
    the evaluation pod (a GPU each)."""
    nodes = runs.add_nodes(2)
    runs.create(runs.manifest(name, nodes, 1, 1, checkpointVolume={"claimName": "checkpoints"},
                              eval=EVAL | eval_fields))
    runs.wait_phase(name, "Running")


def report_checkpoint(runs: Runs, name: str, step: int, target: int = 100) -> None:
    """What the trainer's rank 0 patches when it publishes a checkpoint (admin credentials
    here; the trainer-status policy test covers the trainer's own)."""
    progress = {"step": step, "targetSteps": target, "tokens": step * 1000, "checkpointStep": step,
                "checkpointTokens": step * 1000, "checkpointTime": "2026-12-01T10:00:00Z"}
    runs.custom.patch_namespaced_custom_object_status(GROUP, VERSION, runs.namespace, PLURAL, name,
                                                      {"status": {"progress": progress}})


def jobs(runs: Runs, name: str) -> dict[str, client.V1Job]:
    batch = client.BatchV1Api(runs.cluster.api())
    return {j.metadata.name: j for j in batch.list_namespaced_job(
        runs.namespace, label_selector=f"bloomrun.io/eval-of={name}").items}


def wait_job(runs: Runs, name: str, step: int) -> client.V1Job:
    return wait_for(lambda: jobs(runs, name).get(f"{name}-eval-{step}"), 30, f"the Job of checkpoint {step}")


def running_pod(runs: Runs, job: str, exclude: set[str] = frozenset()) -> str:
    """The Job's pod once kwok runs it (a retry's pod: a name not in `exclude`)."""
    def find():
        pods = runs.core.list_namespaced_pod(runs.namespace, label_selector=f"batch.kubernetes.io/job-name={job}").items
        return next((p.metadata.name for p in pods if p.status.phase == "Running" and p.metadata.name not in exclude),
                    None)
    return wait_for(find, 60, f"a running pod of Job {job}")


def summary(step: int, mean: float, stderr: float | None = None) -> str:
    """bloomctl eval's summary; with `stderr`, each task's and the mean's, as the CLI writes them."""
    accuracies = {"bloomrun_stories_order": mean, "arc_easy": mean}
    stderrs = dict.fromkeys(accuracies, stderr) if stderr is not None else {}
    return message.encode(step, step * 1000, mean, (mean - 0.25) / 0.75, accuracies,
                          mean_stderr=mean_stderr(list(stderrs.values())), stderrs=stderrs)


def test_each_new_checkpoint_gets_one_job_even_across_an_operator_restart(runs, operator, cluster):
    start_run(runs, "evr", maxConcurrent=2)
    report_checkpoint(runs, "evr", 10)
    first = wait_job(runs, "evr", 10)
    spec = first.spec.template.spec
    assert spec.containers[0].command[:5] == ["python", "-m", "bloomrun.cli", "eval",
                                              f"/checkpoints/{runs.namespace}/evr/{runs.get('evr')['metadata']['uid']}"
                                              "/step-00000010"]
    assert first.metadata.owner_references[0].kind == "BloomRun" and first.spec.backoff_limit == 1
    # The operator is killed; the trainer publishes another checkpoint meanwhile.
    operator.child.stop(grace=0.1)
    report_checkpoint(runs, "evr", 20)
    operator.child.start()
    operator.wait_live()
    wait_job(runs, "evr", 20)
    # Reconciles after the restart: still exactly one Job per checkpoint, the first untouched.
    wait_for(lambda: runs.status("evr").get("evaluation", {}).get("running") == [10, 20], 30, "both running")
    found = jobs(runs, "evr")
    assert sorted(found) == ["evr-eval-10", "evr-eval-20"]
    assert found["evr-eval-10"].metadata.uid == first.metadata.uid
    # The pods end with the summary bloomctl eval writes; status shows the newest step.
    cluster.succeed_pod(runs.namespace, running_pod(runs, "evr-eval-10"), message=summary(10, 0.4))
    cluster.succeed_pod(runs.namespace, running_pod(runs, "evr-eval-20"), message=summary(20, 0.55, stderr=0.03))
    evaluation = runs.wait_status("evr", lambda s: (s.get("evaluation") or {}).get("scored") == 2, 60,
                                  "two checkpoints scored")["evaluation"]
    assert evaluation["step"] == 20 and evaluation["tokens"] == 20000 and evaluation["mean"] == 0.55
    assert evaluation["tasks"] == {"arc_easy": 0.55, "bloomrun_stories_order": 0.55}
    # The standard errors pass the CRD's schema (not pruned) into status, for a study's verdict.
    assert evaluation["meanStderr"] == mean_stderr([0.03, 0.03])
    assert evaluation["taskStderr"] == {"arc_easy": 0.03, "bloomrun_stories_order": 0.03}
    assert evaluation["running"] == [] and evaluation["failed"] == 0
    table = cluster.kubectl("get", "br", "evr", "-n", runs.namespace).stdout
    assert "EVAL" in table.splitlines()[0] and "0.55" in table.splitlines()[1]
    metrics = operator.metrics()
    labels = f'namespace="{runs.namespace}",run="evr"'
    assert f"bloomrun_run_eval_mean_accuracy_ratio{{{labels}}} 0.55" in metrics
    assert f'bloomrun_run_eval_accuracy_ratio{{{labels},task="arc_easy"}} 0.55' in metrics
    assert f"bloomrun_run_eval_checkpoint_tokens{{{labels}}} 20000.0" in metrics
    assert {e.reason for e in runs.events("evr")} >= {"EvalScored"}
    # Nothing new is due: no Job appears for a checkpoint already scored.
    report_checkpoint(runs, "evr", 20)
    assert sorted(jobs(runs, "evr")) == ["evr-eval-10", "evr-eval-20"]


def test_a_crashed_evaluation_is_retried_and_bad_input_fails_at_once_without_touching_training(runs, operator, cluster):
    start_run(runs, "evf")
    report_checkpoint(runs, "evf", 10)
    wait_job(runs, "evf", 10)
    # A crash (OOM-killed): the Job's own backoff replaces the pod; the run does not notice.
    crashed = running_pod(runs, "evf-eval-10")
    cluster.fail_pod(runs.namespace, crashed, reason="OOMKilled")
    retry = running_pod(runs, "evf-eval-10", exclude={crashed})
    cluster.succeed_pod(runs.namespace, retry, message=summary(10, 0.5))
    status = runs.wait_status("evf", lambda s: (s.get("evaluation") or {}).get("scored") == 1, 60, "scored")
    assert status["evaluation"]["failed"] == 0 and status["restarts"] == 0 and status["phase"] == "Running"
    # Bad input (bloomctl eval's exit 2, its error as the message): failed at once, not retried.
    report_checkpoint(runs, "evf", 20)
    wait_job(runs, "evf", 20)
    pod = running_pod(runs, "evf-eval-20")
    error = message.encode_error("/checkpoints/x/step-00000020: no metadata.json (incomplete checkpoint)")
    cluster.fail_pod(runs.namespace, pod, exit_code=2, message=error)
    status = runs.wait_status("evf", lambda s: (s.get("evaluation") or {}).get("failed") == 1, 60, "failed")
    failure = status["evaluation"]["lastFailure"]
    assert failure["step"] == 20 and failure["job"] == "evf-eval-20" and failure["reason"] == "PodFailurePolicy"
    assert "incomplete checkpoint" in failure["message"]
    pods = runs.core.list_namespaced_pod(runs.namespace, label_selector="batch.kubernetes.io/job-name=evf-eval-20")
    assert [p.metadata.name for p in pods.items] == [pod]  # no retry for bad input
    assert status["phase"] == "Running" and status["restarts"] == 0
    assert [p.metadata.name for p in runs.running_pods("evf")] == ["evf-worker-0"]
    assert status["evaluation"]["step"] == 10 and status["evaluation"]["mean"] == 0.5  # the last good result stays
    warning = next(e for e in runs.events("evf") if e.reason == "EvalFailed")
    assert warning.type == "Warning" and "training is unaffected" in warning.message
    assert 'state="failed"} 1.0' in operator.metrics()
