"""The operator's side of a BloomStudy: one BloomRun per arm, and the study's status.

`plan(study_body, runs, now)` is pure: from the study as stored and its arms' BloomRuns (by
arm name, as read from the API server) it decides which arm runs to create, which to
(un)suspend, the study's status and its Events. `StudyController` carries the plan out with
the same rules as a run's children: create-first, and a name taken by an object the study
does not control is never adopted (kube.create_owned).

What each arm runs is bloomrun.study.spec's (arm_specs/arm_manifest): trained to
compareAtTokens (the run ends Succeeded there, after its final checkpoint), scored by the
study's eval, within its share of the budget (the run's spec.budget, which the run's own
reconcile enforces). At most spec.maxConcurrent arm runs are unfinished at once; the others
are created as earlier ones finish, in the order of spec.arms. A run that fails for good
marks the study Degraded; the other arms go on. Deleting the study deletes its runs (owner
references, garbage collection); spec.suspend is copied onto every arm's run.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone

from bloomrun.operator.kube import ApiError, Conflict, ForeignObject, Kube, NamespaceTerminating, api_prefix
from bloomrun.operator.metrics import OperatorMetrics
from bloomrun.operator.spec import API_VERSION, BloomRunStatus, Condition, ManifestError
from bloomrun.study import spec as study_spec
from bloomrun.study.spec import ArmStatus, BloomStudy, BloomStudyStatus

log = logging.getLogger(__name__)

FINISHED = ("Succeeded", "Failed")  # a BloomRun phase that holds no slot of maxConcurrent
DEGRADED = "Degraded"
INVALID_STUDY = "InvalidStudy"
REQUEUE_S = 10.0
STUDY_PATH = (api_prefix(API_VERSION), study_spec.PLURAL)


@dataclass
class StudyPlan:
    creates: list[dict] = field(default_factory=list)
    """Arm BloomRuns to create (owner reference included)."""
    suspend: dict[str, bool] = field(default_factory=dict)
    """Existing arm run name -> the spec.suspend it must get."""
    status: BloomStudyStatus = field(default_factory=BloomStudyStatus)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    """(type, reason, message)."""
    arm_runs: dict[str, str] = field(default_factory=dict)
    """Arm -> its BloomRun's name, for the arms whose run exists or is created now (the
    bloomrun_study_arm_info series); empty for a refused study."""
    budget_hours: float | None = None
    """spec.budget.gpuHours of a valid study (bloomrun_study_gpu_budget_seconds)."""


def owner_reference(body: dict) -> dict:
    meta = body["metadata"]
    return {"apiVersion": API_VERSION, "kind": study_spec.KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def arm_status(name: str, run_name: str, run: dict | None, estimate: float) -> ArmStatus:
    """One arm's row from its BloomRun (None: not created yet). Trained: the run reached the
    comparison point but its final checkpoint is not scored yet."""
    row = ArmStatus(name=name, run=run_name, estimated_gpu_hours=estimate)
    if run is None:
        return row
    status = BloomRunStatus.model_validate(run.get("status") or {})
    progress, scored = status.progress, status.evaluation
    row.tokens = progress.checkpoint_tokens if progress.checkpoint_tokens is not None else progress.tokens
    row.gpu_hours = status.gpu_hours.used
    row.message = status.message
    if scored is not None and scored.mean is not None:
        row.eval_step, row.eval_tokens = scored.step, scored.tokens
        row.mean, row.normalised_mean, row.tasks = scored.mean, scored.normalised_mean, dict(scored.tasks)
        row.stderr = scored.mean_stderr  # as a local study's, from the same summary (bloomctl eval's)
    phase = status.phase or "Pending"
    if phase == "Succeeded":
        row.loss = progress.loss
        final = progress.checkpoint_step
        row.phase = "Succeeded" if scored is not None and scored.step is not None and scored.step == final else "Trained"
        failure = scored.last_failure if scored is not None else None
        if row.phase == "Trained" and failure is not None and failure.step == final:
            # Settled without a score: the evaluation Job of the final checkpoint failed for good.
            row.message = f"evaluation of the final checkpoint (step {final}) failed: {failure.reason} {failure.message}"
    elif phase == "Failed":
        row.phase = "Failed"
    elif phase in ("Suspended", "Restarting"):
        row.phase = "Stopped"
    else:
        row.phase = phase  # Pending or Running
    return row


def _condition(previous: list[Condition], type_: str, on: bool, reason: str, message: str, now: str,
               generation: int | None) -> Condition:
    """The condition, keeping its lastTransitionTime while its status stays."""
    status = "True" if on else "False"
    old = next((c for c in previous if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == status else now
    return Condition(type=type_, status=status, reason=reason, message=message, last_transition_time=since,
                     observed_generation=generation)


def plan(body: dict, runs: dict[str, dict], now: datetime) -> StudyPlan:
    """What to do for the study `body` whose arms' runs are `runs` (arm name -> BloomRun)."""
    meta = body["metadata"]
    old = BloomStudyStatus.model_validate(body.get("status") or {})
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    generation = meta.get("generation")
    result = StudyPlan()
    try:
        # Every rule of `bloomctl validate`, including those the API server cannot check (budget).
        study = study_spec.parse_study({k: body[k] for k in ("apiVersion", "kind", "spec")}
                                       | {"metadata": {"name": meta["name"], "namespace": meta.get("namespace")}})
        specs = study_spec.arm_specs(study.spec)
    except ManifestError as err:
        result.status = old.model_copy(update={"phase": "Failed", "message": str(err),
                                               "observed_generation": generation})
        if old.message != str(err):
            result.events.append(("Warning", INVALID_STUDY, str(err)))
        return result
    spec = study.spec
    result.budget_hours = spec.budget.gpu_hours
    costs = study_spec.arm_costs(spec)
    rows, unfinished = [], sum(1 for run in runs.values() if _run_phase(run) not in FINISHED)
    for arm in spec.arms:
        run_name = study_spec.arm_run_name(meta["name"], arm.name)
        run = runs.get(arm.name)
        if run is None and unfinished < spec.max_concurrent:
            result.creates.append(_arm_run(body, study, arm.name, specs[arm.name]))
            result.events.append(("Normal", "ArmCreated", f"arm {arm.name}: created BloomRun {run_name}"))
            unfinished += 1
            result.arm_runs[arm.name] = run_name
        elif run is not None and bool((run.get("spec") or {}).get("suspend", False)) != spec.suspend:
            result.suspend[run_name] = spec.suspend
        if run is not None:
            result.arm_runs[arm.name] = run_name
        rows.append(arm_status(arm.name, run_name, run, costs[arm.name]))
    result.status = _study_status(old, rows, spec, stamp, generation)
    result.events += _transitions(old, result.status)
    return result


def _run_phase(run: dict) -> str:
    return (run.get("status") or {}).get("phase") or "Pending"


def _arm_run(body: dict, study: BloomStudy, arm: str, spec) -> dict:
    manifest = study_spec.arm_manifest(study, arm, spec)
    manifest["metadata"]["namespace"] = body["metadata"]["namespace"]
    manifest["metadata"]["ownerReferences"] = [owner_reference(body)]
    if study.spec.suspend:
        manifest["spec"]["suspend"] = True
    return manifest


def _study_status(old: BloomStudyStatus, rows: list[ArmStatus], spec, now: str,
                  generation: int | None) -> BloomStudyStatus:
    failed = [row.name for row in rows if row.phase == "Failed"]
    done = sum(1 for row in rows if row.phase == "Succeeded")
    settled = all(row.phase in ("Succeeded", "Failed") or _unscorable(row) for row in rows)
    if failed and len(failed) == len(rows):
        phase, message = "Failed", "every arm failed"
    elif settled:
        phase, message = "Succeeded", f"{done} of {len(rows)} arms trained and scored at {spec.compare_at_tokens:,} tokens"
    elif spec.suspend:
        phase, message = "Suspended", "spec.suspend: every arm's run is suspended"
    elif any(row.phase != "Pending" for row in rows):
        phase, message = "Running", f"{done} of {len(rows)} arms done"
    else:
        phase, message = "Pending", f"{done} of {len(rows)} arms done"
    degraded = _condition(old.conditions, DEGRADED, bool(failed), "ArmFailed" if failed else "NoArmFailed",
                          f"arms failed for good: {', '.join(failed)}; the others continue" if failed else "",
                          now, generation)
    completed = _condition(old.conditions, "Complete", settled, "AllArmsSettled" if settled else "ArmsPending",
                           message, now, generation)
    used = [row.gpu_hours for row in rows if row.gpu_hours is not None]
    return BloomStudyStatus(phase=phase, message=message, observed_generation=generation, arms=rows,
                            arm_count=len(rows), done=done, comparison=study_spec.compare(rows),
                            gpu_hours=sum(used) if used else None, conditions=[degraded, completed])


def _unscorable(row: ArmStatus) -> bool:
    return row.phase == "Trained" and row.message.startswith("evaluation of the final checkpoint")


def _transitions(old: BloomStudyStatus, new: BloomStudyStatus) -> list[tuple[str, str, str]]:
    """Events for arms that newly failed or finished, and for the study's end."""
    before = {row.name: row.phase for row in old.arms}
    events = []
    for row in new.arms:
        if row.phase == before.get(row.name):
            continue
        if row.phase == "Failed":
            events.append(("Warning", "ArmFailed", f"arm {row.name} failed for good ({row.message}); "
                                                   "the study is Degraded, the other arms continue"))
        elif row.phase == "Succeeded":
            events.append(("Normal", "ArmDone", f"arm {row.name}: loss {row.loss}, mean accuracy {row.mean}"))
    if new.phase in ("Succeeded", "Failed") and old.phase != new.phase:
        events.append(("Normal" if new.phase == "Succeeded" else "Warning", f"Study{new.phase}",
                       f"{new.message}; {study_spec.describe(new.comparison)}"))
    return events


def status_patch(status: BloomStudyStatus) -> dict:
    return status.model_dump(by_alias=True, mode="json")


class StudyController:
    """Reads the study and its runs, plans, and applies the plan (the run controller's order:
    children first, then the status conditionally on the resourceVersion read, then Events)."""

    def __init__(self, kube: Kube, metrics: OperatorMetrics | None = None):
        self.kube = kube
        self.metrics = metrics or OperatorMetrics()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def _path(self, namespace: str, name: str | None = None) -> str:
        prefix, plural = STUDY_PATH
        path = f"{prefix}/namespaces/{namespace}/{plural}"
        return f"{path}/{name}" if name else path

    def arm_runs(self, namespace: str, study: str, uid: str) -> dict[str, dict]:
        """The study's runs by arm: those labelled with it and controlled by it (uid)."""
        listed = self.kube.request("GET", f"{api_prefix(API_VERSION)}/namespaces/{namespace}/bloomruns",
                                   query={"labelSelector": f"{study_spec.STUDY_LABEL}={study}"}) or {}
        runs = {}
        for run in listed.get("items") or []:
            owners = run["metadata"].get("ownerReferences") or []
            if any(ref.get("uid") == uid and ref.get("controller") for ref in owners):
                runs[run["metadata"]["labels"][study_spec.ARM_LABEL]] = run
        return runs

    def reconcile(self, namespace: str, name: str) -> None:
        try:
            body = self.kube.request("GET", self._path(namespace, name))
        except ApiError as err:
            if err.status == 404:
                self.metrics.forget_study(namespace, name)
                return
            raise
        if body is None or body["metadata"].get("deletionTimestamp"):
            # The garbage collector removes the arms' runs through owner references; their
            # deletion triggers this reconcile again, so the study's series go too.
            self.metrics.forget_study(namespace, name)
            return
        uid = body["metadata"]["uid"]
        result = plan(body, self.arm_runs(namespace, name, uid), datetime.now(timezone.utc))
        for manifest in result.creates:
            try:
                self.kube.create_owned(manifest, uid)
            except ForeignObject as err:
                result.events.append(("Warning", "ForeignRun", str(err)))
                result.arm_runs.pop(manifest["metadata"]["labels"][study_spec.ARM_LABEL], None)
        self.metrics.observe_study(namespace, name, result.arm_runs, result.budget_hours)
        for run_name, suspend in result.suspend.items():
            self.kube.request("PATCH", f"{api_prefix(API_VERSION)}/namespaces/{namespace}/bloomruns/{run_name}",
                              {"spec": {"suspend": suspend}}, content_type="application/merge-patch+json")
        if status_patch(result.status) != status_patch(BloomStudyStatus.model_validate(body.get("status") or {})):
            try:
                self.kube.request("PATCH", self._path(namespace, name) + "/status",
                                  {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
                                   "status": status_patch(result.status)},
                                  content_type="application/merge-patch+json")
            except Conflict:
                return  # the next trigger plans again from a fresh read
        for type_, reason, message in result.events:
            self.kube.post_event(body, type_, reason, message)

    def reconcile_or_log(self, namespace: str, name: str) -> None:
        """Serialised per study (kopf runs the timer and the runs' events on threads); logs
        instead of raising, so the timer retries instead of kopf backing off."""
        with self._guard:
            lock = self._locks.setdefault((namespace, name), threading.Lock())
        try:
            with lock:
                self.reconcile(namespace, name)
        except NamespaceTerminating:
            pass
        except (ApiError, OSError) as err:
            log.warning("reconcile of study %s/%s failed: %s (retried)", namespace, name, err)
        except Exception:  # a bug must not end the timer silently
            log.exception("reconcile of study %s/%s crashed (retried)", namespace, name)
