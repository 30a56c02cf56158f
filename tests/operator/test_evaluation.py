"""Evaluation of checkpoints by Jobs (bloomrun/operator/evaluation.py): which checkpoints are
due, the Job, the summary in its termination message, and the planner's use of them. Pure:
no cluster."""

import json
from datetime import datetime, timezone

import pytest
import yaml
from prometheus_client import generate_latest

from bloomrun.cli.main import EXIT_USAGE
from bloomrun.eval import message
from bloomrun.eval.runner import mean_stderr
from bloomrun.operator import desired, evaluation
from bloomrun.operator.evaluation import JobView
from bloomrun.operator.kube import Conflict, ForeignObject, Kube, LeftoverChild
from bloomrun.operator.metrics import OperatorMetrics
from bloomrun.operator.reconcile import plan
from bloomrun.operator.spec import BloomRunSpec, BloomRunStatus, EvalConfig, ManifestError, Progress, parse_manifest

from .conftest import make_run, manifest

T0 = datetime(2026, 12, 1, 10, 0, 0, tzinfo=timezone.utc)
CLAIM = {"claimName": "checkpoints"}
EVAL = {"tasks": ["bloomrun_stories_order", "arc_easy"], "limit": 50}


def eval_run(gpus_per_node=8, checkpoint_volume=CLAIM, **eval_fields):
    return make_run(gpusPerNode=gpus_per_node, checkpointVolume=checkpoint_volume,
                    dataVolume={"claimName": "corpora"}, pool={"nodeSelector": {"bloomrun.io/pool": "a100-80gb"}},
                    eval=EVAL | eval_fields)


def at(status: BloomRunStatus, step: int, tokens: int | None = None, target: int = 1000) -> BloomRunStatus:
    """The status after the trainer reported checkpoint `step`."""
    new = status.model_copy(deep=True)
    new.progress = Progress(step=step, target_steps=target, checkpoint_step=step,
                            checkpoint_tokens=step * 100 if tokens is None else tokens)
    return new


def job(run, step, state="Active", summary=None, reason="", owner=None):
    return JobView(name=evaluation.job_name(run, step), uid=f"job-{step}", step=step, state=state, reason=reason,
                   owner_uid=owner or run.uid, summary=summary)


def summary(step, mean=0.5, stderr=None):
    """bloomctl eval's summary; with `stderr`, each task's and the mean's, as the CLI writes them."""
    accuracies = {"bloomrun_stories_order": mean, "arc_easy": mean}
    stderrs = {task: stderr for task in accuracies} if stderr is not None else {}
    return message.encode(step, step * 100, mean, (mean - 0.25) / 0.75, accuracies,
                          mean_stderr=mean_stderr(list(stderrs.values())), stderrs=stderrs)


def reconcile(run, status, jobs=()):
    result = plan(run, status, [], T0, eval_jobs=list(jobs))
    return result, result.status


def created(result) -> list[str]:
    return [j["metadata"]["name"] for j in result.eval_jobs]


# ------------------------------------------------------------------------- scheduling


def test_each_new_checkpoint_gets_one_job_and_never_a_second():
    run = eval_run()
    result, status = reconcile(run, at(BloomRunStatus(), 100))
    assert created(result) == ["ablation-eval-100"]
    assert status.evaluation.running == [100] and result.status_changed
    # The Job is observed: nothing to create, however often the run is reconciled.
    for _ in range(3):
        result, status = reconcile(run, status, [job(run, 100)])
        assert created(result) == [] and status.evaluation.running == [100]


def test_after_an_operator_restart_a_recorded_step_whose_job_is_not_seen_is_created_again_under_its_name():
    """The status write precedes the create: a crash between them leaves the step in
    `running` and no Job. The retry uses the same name, so at most one Job ever exists."""
    run = eval_run()
    _, status = reconcile(run, at(BloomRunStatus(), 100))
    restarted = BloomRunStatus.model_validate(status.model_dump(by_alias=True, mode="json"))
    result, again = reconcile(run, restarted)
    assert created(result) == ["ablation-eval-100"] and again.evaluation.running == [100]
    assert again.evaluation.queued == [] and again.evaluation.seen_step == 100


def test_every_checkpoints_counts_the_checkpoints_seen():
    run = eval_run(everyCheckpoints=2)
    status, names = BloomRunStatus(), []
    for step in (100, 200, 300, 400, 500):
        result, status = reconcile(run, at(status, step), [job(run, s, "Complete", summary(s))
                                                           for s in status.evaluation.running] if status.evaluation else [])
        names += created(result)
    assert names == ["ablation-eval-200", "ablation-eval-400"]


def test_every_tokens_scores_the_first_checkpoint_at_or_past_each_multiple_and_always_the_last():
    run = eval_run(everyTokens=1000, maxConcurrent=8)
    status, names = BloomRunStatus(), []
    for step, tokens in ((1, 400), (2, 800), (3, 1200), (4, 1600), (5, 2100), (6, 2400), (7, 2500)):
        running = [job(run, s) for s in status.evaluation.running] if status.evaluation else []
        result, status = reconcile(run, at(status, step, tokens, target=7), running)
        names += created(result)
    assert names == ["ablation-eval-3", "ablation-eval-5", "ablation-eval-7"]  # 7: the final checkpoint
    assert status.evaluation.due_tokens == 2500


def test_every_tokens_waits_for_a_trainer_that_reports_no_checkpoint_tokens():
    run = eval_run(everyTokens=1000)
    status = BloomRunStatus(progress=Progress(step=5, checkpoint_step=5))
    result, status = reconcile(run, status)
    assert created(result) == [] and status.evaluation.message == evaluation.NO_TOKENS
    assert status.evaluation.seen_step is None  # looked at again once tokens arrive
    result, status = reconcile(run, at(status, 5, 1500))
    assert created(result) == ["ablation-eval-5"] and status.evaluation.message == ""


def test_at_most_max_concurrent_jobs_run_and_the_rest_wait_in_order():
    run = eval_run(maxConcurrent=1)
    _, status = reconcile(run, at(BloomRunStatus(), 100))
    result, status = reconcile(run, at(status, 200), [job(run, 100)])
    result, status = reconcile(run, at(status, 300), [job(run, 100)])
    assert created(result) == [] and status.evaluation.running == [100] and status.evaluation.queued == [200, 300]
    result, status = reconcile(run, status, [job(run, 100, "Complete", summary(100))])
    assert created(result) == ["ablation-eval-200"]
    assert status.evaluation.running == [200] and status.evaluation.queued == [300]


def test_a_finished_job_records_its_summary_once_and_status_shows_the_newest_step():
    run = eval_run(maxConcurrent=2)
    _, status = reconcile(run, at(BloomRunStatus(), 100))
    _, status = reconcile(run, at(status, 200), [job(run, 100)])
    # 200 finishes before 100: the newest stays shown when 100 comes in after it.
    result, status = reconcile(run, status, [job(run, 100), job(run, 200, "Complete", summary(200, 0.6))])
    ev = status.evaluation
    assert (ev.step, ev.tokens, ev.mean, ev.scored, ev.running) == (200, 20000, 0.6, 1, [100])
    assert ev.tasks == {"arc_easy": 0.6, "bloomrun_stories_order": 0.6}
    assert ev.normalised_mean == pytest.approx((0.6 - 0.25) / 0.75, abs=1e-4)
    assert [e.reason for e in result.events if e.reason.startswith("Eval")] == ["EvalScored"]
    result, status = reconcile(run, status, [job(run, 100, "Complete", summary(100, 0.4)),
                                             job(run, 200, "Complete", summary(200, 0.6))])
    assert status.evaluation.step == 200 and status.evaluation.mean == 0.6 and status.evaluation.scored == 2
    # Recorded: reconciling again counts nothing twice.
    result, again = reconcile(run, status, [job(run, 100, "Complete", summary(100, 0.4)),
                                            job(run, 200, "Complete", summary(200, 0.6))])
    assert again.evaluation == status.evaluation and not [e for e in result.events if e.reason.startswith("Eval")]


def test_the_mean_stderr_and_each_tasks_reach_the_status_and_an_older_summary_leaves_them_unset():
    run = eval_run(maxConcurrent=2)
    _, status = reconcile(run, at(BloomRunStatus(), 100))
    _, status = reconcile(run, at(status, 200))
    result, status = reconcile(run, status, [job(run, 100, "Complete", summary(100, 0.4, stderr=0.03))])
    ev = status.evaluation
    assert ev.mean_stderr == mean_stderr([0.03, 0.03]) and ev.task_stderr == {"arc_easy": 0.03,
                                                                             "bloomrun_stories_order": 0.03}
    scored = next(e for e in result.events if e.reason == "EvalScored")
    assert "mean accuracy 0.4000 ± 0.0212, normalised 0.2000 over 2 tasks" in scored.message
    # A newer step from an evaluation image without stderr (the summary of before): none shown,
    # not the older step's figure.
    older = '{"v":1,"step":200,"tokens":20000,"mean":0.6,"normalisedMean":0.4667,"tasks":{"arc_easy":0.6}}'
    _, status = reconcile(run, status, [job(run, 200, "Complete", older)])
    ev = status.evaluation
    assert (ev.step, ev.mean, ev.mean_stderr, ev.task_stderr, ev.tasks) == (200, 0.6, None, {}, {"arc_easy": 0.6})
    dumped = status.model_dump(by_alias=True, mode="json")["evaluation"]
    assert dumped["meanStderr"] is None and dumped["taskStderr"] == {}


def test_a_failed_evaluation_is_recorded_and_never_touches_training(run):
    run = eval_run()
    _, status = reconcile(run, at(BloomRunStatus(), 100))
    status.phase = "Running"
    error = message.encode_error("checkpoint step-00000100: no metadata.json (incomplete checkpoint)")
    result, status = reconcile(run, status, [job(run, 100, "Failed", error, reason="PodFailurePolicy")])
    failure = status.evaluation.last_failure
    assert (failure.step, failure.job, failure.reason) == (100, "ablation-eval-100", "PodFailurePolicy")
    assert "incomplete checkpoint" in failure.message and status.evaluation.failed == 1
    assert status.evaluation.running == [] and status.evaluation.step is None
    event = next(e for e in result.events if e.reason == "EvalFailed")
    assert event.type == "Warning" and "training is unaffected" in event.message
    assert status.restarts == 0 and status.phase != "Failed" and not result.deletes and not result.finish_reason
    # A Job that exited 0 but left no summary is a failure too, with the log's tail as message.
    _, status = reconcile(run, at(status, 200))
    _, status = reconcile(run, status, [job(run, 200, "Complete", "Traceback ...\nKeyError: 'x'")])
    assert status.evaluation.last_failure.reason == "NoSummary" and "KeyError" in status.evaluation.last_failure.message


def test_jobs_of_an_earlier_run_of_the_same_name_are_not_this_runs():
    run = eval_run()
    _, status = reconcile(run, at(BloomRunStatus(), 100))
    stale = job(run, 100, "Complete", summary(100), owner="uid-of-the-deleted-run")
    result, status = reconcile(run, status, [stale])
    assert status.evaluation.scored == 0 and created(result) == ["ablation-eval-100"]


def test_without_a_checkpoint_claim_evaluation_is_off_and_says_why():
    run = eval_run(checkpoint_volume={})
    result, status = reconcile(run, at(BloomRunStatus(), 100))
    assert created(result) == [] and status.evaluation.message == evaluation.NO_VOLUME
    assert [e.reason for e in result.events if e.reason.startswith("Eval")] == ["EvalOff"]
    result, _ = reconcile(run, at(status, 200))
    assert not [e for e in result.events if e.reason.startswith("Eval")]  # said once


def test_a_run_without_eval_has_no_evaluation_status():
    result, status = reconcile(make_run(checkpointVolume=CLAIM), at(BloomRunStatus(), 100))
    assert status.evaluation is None and created(result) == []


def test_a_job_whose_pod_ended_is_waiting_for_its_summary_until_recorded():
    run = eval_run()
    _, status = reconcile(run, at(BloomRunStatus(), 100))
    jobs = [job(run, 100, "Complete"), job(run, 7, "Complete")]  # 7: recorded long ago
    assert [j.step for j in evaluation.awaiting_summary(status, jobs)] == [100]


def test_job_view_reads_the_terminal_condition():
    body = {"metadata": {"name": "r-eval-5", "uid": "u", "labels": {evaluation.STEP_LABEL: "5"},
                         "ownerReferences": [{"uid": "run-uid", "controller": True}]},
            "status": {"conditions": [{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"},
                                      {"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]}}
    view = JobView.from_body(body)
    assert (view.step, view.state, view.reason, view.owner_uid, view.finished) == (
        5, "Failed", "PodFailurePolicy", "run-uid", True)
    body["status"] = {"active": 1}
    assert JobView.from_body(body).state == "Active"


# ----------------------------------------------------------------------------- the Job


def test_the_job_runs_bloomctl_eval_on_its_checkpoint_offline_with_the_runs_image_and_volumes():
    run = eval_run(batchSize=8, taskDataDir="eval-data")
    manifest_ = evaluation.desired_job(run, 1500)
    assert manifest_["metadata"]["name"] == "ablation-eval-1500"
    assert manifest_["metadata"]["ownerReferences"] == [desired.owner_reference(run)]
    spec = manifest_["spec"]
    assert spec["backoffLimit"] == 2 and spec["ttlSecondsAfterFinished"] == evaluation.TTL_AFTER_FINISHED_S
    fail_job = spec["podFailurePolicy"]["rules"][0]
    assert fail_job["action"] == "FailJob" and fail_job["onExitCodes"]["values"] == [EXIT_USAGE]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    folder = f"/checkpoints/team-a/ablation/{run.uid}"
    assert container["command"] == [
        "python", "-m", "bloomrun.cli", "eval", f"{folder}/step-00001500", "--config", "/etc/bloomrun/config.yaml",
        "--tasks", "bloomrun_stories_order", "arc_easy", "--batch-size", "8", "--limit", "50",
        "--task-data-dir", "/data/eval-data", "--device", "cuda", "--summary-file", "/dev/termination-log"]
    assert container["image"] == run.image and container["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HF_DATASETS_OFFLINE"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    # Only its own run's folder of a shared claim; the data read-only (the tokenizer, the tasks).
    assert mounts["checkpoints"] == {"name": "checkpoints", "mountPath": folder,
                                     "subPath": f"team-a/ablation/{run.uid}"}
    assert mounts["data"]["readOnly"] and mounts["config"]["readOnly"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"] == {"claimName": "checkpoints"}
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["nodeSelector"] == {"bloomrun.io/pool": "a100-80gb"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # Not a worker: the pod index of workers selects bloomrun.io/run.
    assert desired.RUN_LABEL not in spec["template"]["metadata"]["labels"]
    assert spec["template"]["metadata"]["labels"][evaluation.EVAL_LABEL] == "ablation"


def test_an_eval_pool_gpus_claim_and_priority_from_the_eval_section():
    run = eval_run(suite="bigscience-27", tasks=None, gpus=2, maxConcurrent=3, backoffLimit=5,
                   priorityClassName="eval-low", taskDataDir="/staged", taskDataClaimName="task-data",
                   pool={"nodeSelector": {"bloomrun.io/pool": "a100-40gb"}},
                   resources={"requests": {"cpu": "8", "memory": "64Gi"}})
    manifest_ = evaluation.desired_job(run, 7)
    pod = manifest_["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert manifest_["spec"]["backoffLimit"] == 5 and pod["priorityClassName"] == "eval-low"
    assert pod["nodeSelector"] == {"bloomrun.io/pool": "a100-40gb"}
    assert container["resources"] == {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"nvidia.com/gpu": "2"}}
    assert "--suite" in container["command"] and "bigscience-27" in container["command"]
    assert container["command"][container["command"].index("--task-data-dir") + 1] == "/staged"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["task-data"] == {"name": "task-data", "mountPath": "/staged", "readOnly": True}
    assert {v["name"]: v for v in pod["volumes"]}["task-data"]["persistentVolumeClaim"] == {
        "claimName": "task-data", "readOnly": True}


def test_a_cpu_run_evaluates_on_the_cpu():
    container = evaluation.desired_job(eval_run(gpus_per_node=0), 1)["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][container["command"].index("--device") + 1] == "cpu"
    assert "nvidia.com/gpu" not in str(container["resources"])


def test_the_eval_section_never_restarts_the_workers():
    """The workers' config.yaml leaves it out (the Job passes it as options), so a change to
    it changes neither the ConfigMap nor the workers' template."""
    before, after = eval_run(), eval_run(limit=10, maxConcurrent=4)
    assert yaml.safe_load(desired.desired_config_map(before)["data"]["config.yaml"])["eval"] is None
    assert desired.template_hash(before) == desired.template_hash(after)
    assert desired.infra_hash(before) == desired.infra_hash(after)


# ------------------------------------------------------------------------- the spec


def test_the_trainer_sees_its_own_eval_section_without_the_cluster_fields():
    spec = BloomRunSpec.model_validate(manifest(eval=EVAL | {"maxConcurrent": 2, "gpus": 0})["spec"])
    section = spec.trainer_config().eval
    assert type(section) is EvalConfig and section.task_names() == EVAL["tasks"] and section.limit == 50
    EvalConfig.model_validate(section.model_dump(by_alias=True, exclude_none=True))  # no unknown field


@pytest.mark.parametrize(("fields", "error"), [
    ({"taskDataClaimName": "staged"}, "taskDataClaimName needs eval.taskDataDir"),
    ({"taskDataClaimName": "staged", "taskDataDir": "relative"}, "an absolute path"),
    ({"maxConcurrent": 0}, "spec.eval.maxConcurrent"),
    ({"backoffLimit": 21}, "spec.eval.backoffLimit"),
    ({"gpus": 17}, "spec.eval.gpus"),
    ({"priorityClassName": "Not_A_Name"}, "spec.eval.priorityClassName"),
])
def test_bad_eval_cluster_fields_are_refused_naming_the_field(fields, error):
    with pytest.raises(ManifestError, match=error):
        parse_manifest(manifest(eval=EVAL | fields))


# ------------------------------------------------------------------- the termination message


def test_the_summary_fits_the_kubelets_4_kib_and_round_trips():
    text = message.encode(1500, 1_572_864_000, 0.41234567, 0.123456, {"arc_easy": 0.55555555, "copa": 0.6},
                          mean_stderr=0.0123456789, stderrs={"arc_easy": 0.0102030405, "copa": 0.046})
    report = message.decode(text)
    assert report.ok and (report.step, report.tokens) == (1500, 1_572_864_000)
    # The figures a study compares arms by arrive exactly; per-task ones are rounded.
    assert (report.mean, report.normalised_mean, report.mean_stderr) == (0.41234567, 0.123456, 0.0123456789)
    assert report.accuracies == {"arc_easy": 0.5556, "copa": 0.6}
    assert report.stderrs == {"arc_easy": 0.0102, "copa": 0.046}
    # 120 long names lose the stderrs, then digits, then tasks, never the means or the mean's stderr.
    many = {f"task_with_a_rather_long_name_number_{i:03d}_of_a_staged_suite": 0.123456 for i in range(120)}
    squeezed = message.encode(1, 1, 0.5, 0.1, many, mean_stderr=0.00312345, stderrs=dict.fromkeys(many, 0.0123))
    assert len(squeezed.encode()) <= message.MAX_BYTES
    report = message.decode(squeezed)
    assert (report.mean, report.mean_stderr) == (0.5, 0.00312345)
    assert 0 < len(report.accuracies) < len(many) and report.stderrs == {}


def test_the_papers_27_tasks_fit_with_every_stderr_at_four_digits():
    from bloomrun.trainer.config import EVAL_SUITES

    tasks = EVAL_SUITES["bigscience-27"]
    assert len(tasks) == 27
    accuracies = {t: 0.123456 + i / 100 for i, t in enumerate(tasks)}
    stderrs = {t: 0.0123456 + i / 1000 for i, t in enumerate(tasks)}
    text = message.encode(1500, 1_572_864_000, 0.4321987654, 0.2345678912, accuracies,
                          mean_stderr=mean_stderr(list(stderrs.values())), stderrs=stderrs)
    assert len(text.encode()) < 2 * 1024  # half the kubelet's limit: room to spare
    report = message.decode(text)
    assert report.accuracies == {t: round(v, 4) for t, v in accuracies.items()}
    assert report.stderrs == {t: round(v, 4) for t, v in stderrs.items()}
    assert report.mean_stderr == mean_stderr(list(stderrs.values()))


def test_per_task_stderrs_go_before_any_accuracy_does():
    # 27 tasks with names long enough that accuracy and stderr together pass 4 KiB, one alone not.
    from bloomrun.trainer.config import EVAL_SUITES

    names = [f"{t}_staged_from_the_teams_volume_as_local_files_with_a_long_descriptive_name_{'x' * 24}"
             for t in EVAL_SUITES["bigscience-27"]]
    accuracies, stderrs = dict.fromkeys(names, 0.5), dict.fromkeys(names, 0.0123)
    assert len(message.encode(1, 1, 0.5, 0.0, accuracies).encode()) <= message.MAX_BYTES < len(
        json.dumps({"tasks": accuracies, "taskStderr": stderrs}, separators=(",", ":")).encode())
    text = message.encode(1, 1, 0.5, 0.0, accuracies, mean_stderr=0.00237, stderrs=stderrs)
    report = message.decode(text)
    assert len(text.encode()) <= message.MAX_BYTES and "truncated" not in json.loads(text)
    assert report.accuracies == accuracies and report.stderrs == {} and report.mean_stderr == 0.00237


def test_a_summary_of_before_the_stderr_still_decodes():
    old = '{"v":1,"step":1500,"tokens":1572864000,"mean":0.4123,"normalisedMean":0.1235,"tasks":{"arc_easy":0.5556,"copa":0.6}}'
    report = message.decode(old)
    assert report.ok and (report.step, report.mean, report.normalised_mean) == (1500, 0.4123, 0.1235)
    assert report.accuracies == {"arc_easy": 0.5556, "copa": 0.6}
    assert (report.mean_stderr, report.stderrs) == (None, {})
    # A task's stderr without its accuracy is dropped; a stderr map that is no map is refused.
    report = message.decode('{"v":1,"step":1,"tasks":{"copa":0.6},"taskStderr":{"copa":0.04,"boolq":0.01}}')
    assert report.stderrs == {"copa": 0.04}
    bad = message.decode('{"v":1,"step":1,"tasks":{"copa":0.6},"taskStderr":[0.04]}')
    assert not bad.ok and bad.error.startswith("malformed evaluation summary (expected an object, got list)")


def test_an_error_or_a_crash_log_decodes_as_an_error():
    assert message.decode(message.encode_error("task copa: its data is not staged")).error == (
        "task copa: its data is not staged")
    assert len(message.encode_error("x " * 5000).encode()) <= message.MAX_BYTES
    crash = "loading...\nTraceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\n"
    assert message.decode(crash).error.endswith("RuntimeError: CUDA out of memory")
    assert not message.decode("").ok and not message.decode('{"v": 1, "step": "x"}').ok


def test_the_job_fails_at_once_on_the_clis_bad_input_exit_code():
    assert evaluation.EXIT_BAD_INPUT == EXIT_USAGE


# ------------------------------------------------------------------------------ metrics


def test_metrics_carry_the_newest_scores_per_run_and_task_and_forget_a_deleted_run():
    run = eval_run()
    _, status = reconcile(run, at(BloomRunStatus(), 100))
    _, status = reconcile(run, status, [job(run, 100, "Complete", summary(100, 0.6))])
    metrics = OperatorMetrics()
    metrics.observe_run("team-a", "ablation", status, None)
    text = generate_latest(metrics.registry).decode()
    labels = 'namespace="team-a",run="ablation"'
    assert f'bloomrun_run_eval_accuracy_ratio{{{labels},task="arc_easy"}} 0.6' in text
    assert f"bloomrun_run_eval_mean_accuracy_ratio{{{labels}}} 0.6" in text
    assert f"bloomrun_run_eval_checkpoint_tokens{{{labels}}} 10000.0" in text
    assert f"bloomrun_run_eval_checkpoint_step{{{labels}}} 100.0" in text
    assert f'bloomrun_run_eval_checkpoints{{{labels},state="scored"}} 1.0' in text
    status.evaluation.tasks = {"arc_easy": 0.7}  # a task dropped from the list: its series goes
    metrics.observe_run("team-a", "ablation", status, None)
    assert "bloomrun_stories_order" not in generate_latest(metrics.registry).decode()
    metrics.forget_run("team-a", "ablation")
    assert 'run="ablation"' not in generate_latest(metrics.registry).decode()


# ------------------------------------------------------------------------ the API calls


class ScriptedKube(Kube):
    """kube.Kube with its one request method answering from a script (no API server)."""

    def __init__(self, *answers):
        super().__init__(api_client=object())
        self.answers, self.calls = list(answers), []

    def request(self, verb, path, body=None, query=None, content_type="application/json"):
        self.calls.append((verb, path, query))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_a_job_is_created_once_and_an_existing_one_is_left_as_it_is_or_refused_when_foreign():
    manifest_ = evaluation.desired_job(eval_run(), 100)
    path = "/apis/batch/v1/namespaces/team-a/jobs"
    kube = ScriptedKube(None)
    assert kube.create_owned(manifest_, "uid-1234") and kube.calls == [("POST", path, None)]
    ours = {"metadata": {"ownerReferences": [{"uid": "uid-1234", "controller": True}]}}
    kube = ScriptedKube(Conflict(409, "AlreadyExists"), ours)
    assert kube.create_owned(manifest_, "uid-1234") is False
    assert [c[0] for c in kube.calls] == ["POST", "GET"]  # never re-applied: a Job's template is immutable
    theirs = {"metadata": {"ownerReferences": [{"uid": "uid-of-another-run", "controller": True}]}}
    with pytest.raises(ForeignObject):
        ScriptedKube(Conflict(409, "AlreadyExists"), theirs).create_owned(manifest_, "uid-1234")


def test_a_child_left_by_a_deleted_run_of_the_same_name_is_waited_for_not_foreign():
    manifest_ = evaluation.desired_job(eval_run(), 100)
    ours = manifest_["metadata"]["ownerReferences"][0]
    predecessor = {"metadata": {"ownerReferences": [{**ours, "uid": "uid-of-the-deleted-run"}]}}
    with pytest.raises(LeftoverChild):
        ScriptedKube(Conflict(409, "AlreadyExists"), predecessor).create_owned(manifest_, ours["uid"])
    # Another run's (other name), or an object claiming no controller: foreign, not leftover.
    other = {"metadata": {"ownerReferences": [{**ours, "uid": "uid-x", "name": "someone-else"}]}}
    for existing in (other, {"metadata": {}}):
        with pytest.raises(ForeignObject) as raised:
            ScriptedKube(Conflict(409, "AlreadyExists"), existing).create_owned(manifest_, ours["uid"])
        assert not isinstance(raised.value, LeftoverChild)


def test_the_termination_message_is_the_last_ended_pods_of_the_job():
    def pod(finished, text):
        return {"status": {"containerStatuses": [{"state": {"terminated": {"finishedAt": finished, "message": text}}}]}}
    pods = {"items": [pod("2026-12-01T10:05:00Z", "crash log"), pod("2026-12-01T10:09:00Z", "summary"),
                      {"status": {"containerStatuses": [{"state": {"running": {}}}]}}]}
    kube = ScriptedKube(pods)
    assert kube.job_termination_message("team-a", "job-uid") == "summary"
    assert kube.calls == [("GET", "/api/v1/namespaces/team-a/pods",
                           {"labelSelector": "batch.kubernetes.io/controller-uid=job-uid"})]
    assert ScriptedKube({"items": []}).job_termination_message("team-a", "gone") == ""
