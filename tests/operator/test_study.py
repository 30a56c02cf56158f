"""The operator's planning for a BloomStudy (bloomrun/operator/study.py), without a cluster."""

from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from bloomrun.operator import study
from bloomrun.operator.kube import ApiError, ForeignObject
from bloomrun.operator.metrics import OperatorMetrics
from bloomrun.eval.runner import mean_stderr
from bloomrun.study.spec import ARM_LABEL, STUDY_LABEL, ArmStatus, budget_shares, compare, load_study

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "study-position.yaml"
NOW = datetime(2026, 12, 1, 11, 0, tzinfo=timezone.utc)


def study_body(**spec) -> dict:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"].update(spec)
    document["metadata"] = {"name": "pos", "namespace": "team-a", "uid": "study-uid", "generation": 1,
                            "resourceVersion": "7"}
    return document


def arm_run(phase=None, suspend=False, step=160, tokens=163840, loss=2.5, mean=None, scored_step=None, hours=0.1,
            stderr=None):
    status = {"gpuHours": {"used": hours},
              "progress": {"checkpointStep": step, "checkpointTokens": tokens, "loss": loss}}
    if phase:
        status["phase"] = phase
    if mean is not None:
        status["evaluation"] = {"step": scored_step if scored_step is not None else step, "tokens": tokens,
                                "mean": mean, "normalisedMean": mean / 2, "tasks": {"t": mean}}
        if stderr is not None:
            status["evaluation"]["meanStderr"] = stderr
    return {"spec": {"suspend": suspend}, "status": status}


def test_the_first_reconcile_creates_max_concurrent_arm_runs_owned_and_labelled():
    result = study.plan(study_body(maxConcurrent=2), {}, NOW)
    assert [m["metadata"]["name"] for m in result.creates] == ["pos-alibi", "pos-rotary"]
    run = result.creates[0]
    assert run["kind"] == "BloomRun" and run["metadata"]["namespace"] == "team-a"
    assert run["metadata"]["labels"] == {STUDY_LABEL: "pos", ARM_LABEL: "alibi"}
    owner = run["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("BloomStudy", "pos", "study-uid", True)
    # Trained to the comparison point, scored by the study's evaluation, within its share.
    shares = budget_shares(load_study(EXAMPLE).spec)
    assert run["spec"]["training"]["trainTokens"] == 163840
    assert run["spec"]["eval"]["tasks"] == ["bloomrun_stories_order", "bloomrun_arithmetic"]
    assert run["spec"]["budget"]["gpuHours"] == pytest.approx(shares["alibi"])
    assert [row.phase for row in result.status.arms] == ["Pending"] * 3
    assert result.status.arm_count == 3 and result.status.done == 0
    assert [e[1] for e in result.events] == ["ArmCreated", "ArmCreated"]


def test_the_next_arm_is_created_only_when_a_slot_frees():
    body = study_body(maxConcurrent=2)
    running = {"alibi": arm_run("Running"), "rotary": arm_run("Pending")}
    assert study.plan(body, running, NOW).creates == []
    finished = {"alibi": arm_run("Succeeded", mean=0.4), "rotary": arm_run("Running")}
    assert [m["metadata"]["name"] for m in study.plan(body, finished, NOW).creates] == ["pos-none"]


def test_a_failed_arm_degrades_the_study_frees_its_slot_and_the_others_continue():
    body = study_body()
    result = study.plan(body, {"alibi": arm_run("Failed")}, NOW)
    assert [m["metadata"]["name"] for m in result.creates] == ["pos-rotary"]
    degraded = next(c for c in result.status.conditions if c.type == "Degraded")
    assert degraded.status == "True" and "alibi" in degraded.message
    assert result.status.phase == "Running"
    assert ("Warning", "ArmFailed") in [(e[0], e[1]) for e in result.events]


def test_the_status_table_and_comparison_at_the_end():
    runs = {"alibi": arm_run("Succeeded", mean=0.5, loss=2.1, hours=0.2),
            "rotary": arm_run("Succeeded", mean=0.45, loss=2.2, hours=0.3),
            "none": arm_run("Failed", hours=0.05)}
    body = study_body()
    result = study.plan(body, runs, NOW)
    status = result.status
    assert status.phase == "Succeeded" and status.done == 2 and status.arm_count == 3
    alibi = status.arms[0]
    assert (alibi.phase, alibi.tokens, alibi.loss, alibi.mean, alibi.normalised_mean) == \
        ("Succeeded", 163840, 2.1, 0.5, 0.25)
    assert alibi.gpu_hours == 0.2 and alibi.estimated_gpu_hours > 0
    assert status.gpu_hours == pytest.approx(0.55)
    assert status.comparison.best == "alibi" and status.comparison.runner_up == "rotary"
    assert status.comparison.lead == pytest.approx(0.05)
    assert "StudySucceeded" in [e[1] for e in result.events]
    # The same statuses again: no new events (a study's Events mark transitions only).
    body["status"] = study.status_patch(status)
    assert study.plan(body, runs, NOW).events == []


SE = mean_stderr([0.03, 0.04])  # 0.025, as bloomctl eval reports it for two tasks


@pytest.mark.parametrize("alibi, rotary, fields, verdict", [
    ((0.55, SE), (0.5, SE), ("alibi", "rotary", True),
     "best arm: alibi, +0.0500 mean acc over rotary, which exceeds the evaluation's standard error (0.0354)"),
    ((0.52, SE), (0.5, SE), ("alibi", "rotary", False),
     "best arm: alibi, +0.0200 mean acc over rotary, which is within the evaluation's standard error (0.0354)"),
    ((0.5, SE), (0.5, SE), ("alibi", "rotary", False),
     "best arm: none, alibi and rotary tie at the comparison point"),
    # Evaluated by an image that predates meanStderr: the lead is not judged.
    ((0.55, None), (0.5, SE), ("alibi", "rotary", None), "best arm: alibi, +0.0500 over rotary (no stderr to compare with)"),
])
def test_the_best_arm_is_judged_against_the_evaluations_stderr_as_a_local_study_judges_it(alibi, rotary, fields,
                                                                                              verdict):
    runs = {"alibi": arm_run("Succeeded", mean=alibi[0], stderr=alibi[1]),
            "rotary": arm_run("Succeeded", mean=rotary[0], stderr=rotary[1]), "none": arm_run("Failed")}
    result = study.plan(study_body(), runs, NOW)
    comparison = result.status.comparison
    assert [row.stderr for row in result.status.arms] == [alibi[1], rotary[1], None]
    assert (comparison.best, comparison.runner_up, comparison.exceeds_stderr) == fields
    assert comparison.verdict == verdict
    assert study.status_patch(result.status)["comparison"]["verdict"] == verdict
    done = next(message for _, reason, message in result.events if reason == "StudySucceeded")
    assert done.endswith(f"; {verdict}")
    # A local study's rows with the same numbers (local.arm_status: mean and mean_stderr from
    # the results file) reach the same comparison.
    local_rows = [ArmStatus(name="alibi", mean=alibi[0], stderr=alibi[1]),
                  ArmStatus(name="rotary", mean=rotary[0], stderr=rotary[1]), ArmStatus(name="none")]
    assert compare(local_rows) == comparison


def test_an_arm_trained_but_not_yet_scored_at_its_final_checkpoint_is_not_done():
    runs = {"alibi": arm_run("Succeeded", mean=0.3, scored_step=140)}
    row = study.plan(study_body(), runs, NOW).status.arms[0]
    assert row.phase == "Trained" and row.loss == 2.5


def test_suspending_the_study_suspends_its_runs_and_new_ones_start_suspended():
    result = study.plan(study_body(suspend=True, maxConcurrent=2), {"alibi": arm_run("Running")}, NOW)
    assert result.suspend == {"pos-alibi": True}
    assert result.creates[0]["spec"]["suspend"] is True
    assert result.status.phase == "Suspended"
    resumed = study.plan(study_body(maxConcurrent=2), {"alibi": arm_run("Suspended", suspend=True)}, NOW)
    assert resumed.suspend == {"pos-alibi": False}


def test_a_study_the_rules_refuse_creates_nothing_and_names_the_field():
    result = study.plan(study_body(budget={"gpuHours": 1e-9}), {}, NOW)
    assert result.creates == [] and result.status.phase == "Failed"
    assert "spec.budget.gpuHours" in result.status.message
    assert result.events[0][1] == study.INVALID_STUDY


def test_an_arm_whose_final_evaluation_failed_for_good_settles_without_a_score():
    failed_eval = arm_run("Succeeded")
    failed_eval["status"]["evaluation"] = {"lastFailure": {"step": 160, "job": "j", "reason": "BackoffLimitExceeded",
                                                           "time": "2026-12-01T10:00:00Z"}, "failed": 1}
    runs = {"alibi": arm_run("Succeeded", mean=0.5), "rotary": failed_eval, "none": arm_run("Succeeded", mean=0.4)}
    status = study.plan(study_body(), runs, NOW).status
    assert status.arms[1].phase == "Trained" and "BackoffLimitExceeded" in status.arms[1].message
    assert status.phase == "Succeeded" and status.done == 2 and status.comparison.best == "alibi"


class StudyKube:
    """The API server as the study controller sees it: the study, its arms' runs (listed by
    label), creates that may hit a foreign object, and nothing else."""

    def __init__(self, body: dict | None, runs: list[dict] = (), foreign: tuple[str, ...] = ()):
        self.body, self.runs, self.foreign, self.created = body, list(runs), foreign, []

    def request(self, verb, path, body=None, query=None, content_type="application/json"):
        if verb == "GET" and path.endswith("/bloomruns"):
            return {"items": self.runs}
        if verb == "GET":
            if self.body is None:
                raise ApiError(404, "not found")
            return self.body
        return {}

    def create_owned(self, manifest, uid):
        if manifest["metadata"]["name"] in self.foreign:
            raise ForeignObject("BloomRun", manifest["metadata"]["namespace"], manifest["metadata"]["name"])
        self.created.append(manifest["metadata"]["name"])
        return True

    def post_event(self, body, type_, reason, message):
        pass


def listed_run(arm: str, **status) -> dict:
    run = arm_run(**status)
    run["metadata"] = {"name": f"pos-{arm}", "labels": {STUDY_LABEL: "pos", ARM_LABEL: arm},
                       "ownerReferences": [{"uid": "study-uid", "controller": True}]}
    return run


def arm_info(metrics: OperatorMetrics) -> set[tuple[str, str, str, str]]:
    """(namespace, study, arm, run) of every bloomrun_study_arm_info series at 1."""
    return {(s.labels["namespace"], s.labels["study"], s.labels["arm"], s.labels["run"])
            for family in metrics.registry.collect() if family.name == "bloomrun_study_arm_info"
            for s in family.samples if s.value == 1}


def study_budget(metrics: OperatorMetrics) -> float | None:
    return metrics.registry.get_sample_value("bloomrun_study_gpu_budget_seconds",
                                             {"namespace": "team-a", "study": "pos"})


def test_reconcile_exports_which_run_is_which_arm_and_drops_the_series_with_the_study():
    metrics = OperatorMetrics()
    body = study_body(maxConcurrent=2)
    kube = StudyKube(body, [listed_run("alibi", phase="Running")])
    study.StudyController(kube, metrics).reconcile("team-a", "pos")
    # alibi's run exists, rotary's is created now; none waits for a slot and has no run yet.
    assert kube.created == ["pos-rotary"]
    assert arm_info(metrics) == {("team-a", "pos", "alibi", "pos-alibi"), ("team-a", "pos", "rotary", "pos-rotary")}
    assert study_budget(metrics) == pytest.approx(body["spec"]["budget"]["gpuHours"] * 3600)
    # Deleting: the study is being deleted, then gone; its series go with it.
    body["metadata"]["deletionTimestamp"] = "2026-12-01T11:30:00Z"
    study.StudyController(kube, metrics).reconcile("team-a", "pos")
    assert arm_info(metrics) == set() and study_budget(metrics) is None
    study.StudyController(StudyKube(None), metrics).reconcile("team-a", "pos")
    assert arm_info(metrics) == set()


def test_an_arm_whose_run_is_not_the_studys_is_not_labelled_as_the_arm():
    metrics = OperatorMetrics()
    kube = StudyKube(study_body(maxConcurrent=2), foreign=("pos-alibi",))
    controller = study.StudyController(kube, metrics)
    controller.reconcile("team-a", "pos")
    assert kube.created == ["pos-rotary"]
    assert arm_info(metrics) == {("team-a", "pos", "rotary", "pos-rotary")}


def test_a_study_refused_after_an_edit_loses_its_arm_series():
    metrics = OperatorMetrics()
    body = study_body()
    controller = study.StudyController(StudyKube(body, [listed_run("alibi", phase="Running")]), metrics)
    controller.reconcile("team-a", "pos")
    assert arm_info(metrics) == {("team-a", "pos", "alibi", "pos-alibi")}
    body["spec"]["budget"] = {"gpuHours": 1e-9}  # below the arms' estimate: refused
    controller.reconcile("team-a", "pos")
    assert arm_info(metrics) == set() and study_budget(metrics) is None
