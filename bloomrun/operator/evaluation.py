"""Evaluation of a run's checkpoints, one Kubernetes Job per checkpoint scored: pure.

Which checkpoints are due, the Job that scores one, and what a finished Job's termination
message says. The planner (reconcile.plan) calls `plan`; the controller creates the Jobs it
returns only after the status write that records them, as it does for worker pods, so
each checkpoint gets exactly one Job even across operator restarts: the Job's name is
fixed by the step (create-first; an existing Job of that name is this run's or a stale
one's, never a second evaluation), and `status.evaluation.running` says which steps have
a Job whose outcome is not yet recorded.

How checkpoints are known: the trainer reports its newest complete checkpoint's step and
tokens in `status.progress` (checkpointStep, checkpointTokens) at once when it publishes
one, and the operator looks every reconcile (at most `--timer-interval` apart). A
checkpoint is due when `eval.everyCheckpoints` checkpoints were seen since the last due one
(default 1: every checkpoint), or, with `eval.everyTokens`, when its tokens pass the next
multiple; the final checkpoint (checkpointStep == targetSteps) always is. docs/eval.md says
why the Job and the termination message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

from bloomrun.eval import message
from bloomrun.operator import desired
from bloomrun.operator.desired import ChildKind, Run
from bloomrun.operator.spec import BloomRunStatus, EvalFailure, Evaluation, Progress, RunEvalConfig
from bloomrun.trainer.checkpoint_layout import step_dir_name
from bloomrun.trainer.resolve import resolve_path

JOB_KIND = ChildKind("Job", "batch/v1", "jobs")
EVAL_LABEL = "bloomrun.io/eval-of"  # on the Jobs and their pods: the run evaluated
STEP_LABEL = "bloomrun.io/eval-step"
COMPONENT = "eval"
CONTAINER = "eval"
SUMMARY_FILE = "/dev/termination-log"  # the kubelet copies it into the pod's status
# `bloomctl eval`'s exit code for bad input (bloomrun.cli.main.EXIT_USAGE; the operator does not
# import the CLI): a missing or corrupt checkpoint, a task whose data is not staged. Retrying
# cannot help, so the Job fails at once; crashes (OOM, a lost node) are retried.
EXIT_BAD_INPUT = 2
# Kept this long after finishing, for `kubectl logs`; the operator records the outcome within
# a reconcile. A Job gone before that (operator down a day) is created again: the step stays
# in status.evaluation.running until its outcome is recorded.
TTL_AFTER_FINISHED_S = 24 * 3600
QUEUE_MAX = 64
NO_VOLUME = ("evaluation is off: spec.checkpointVolume.claimName is unset, and an evaluation Job cannot "
             "read checkpoints from the workers' emptyDir")
NO_TOKENS = "waiting for the trainer to report checkpointTokens (eval.everyTokens counts tokens)"


# ------------------------------------------------------------------------ observation


@dataclass(frozen=True)
class JobView:
    """What the planner needs to know about one evaluation Job."""

    name: str
    uid: str
    step: int
    state: str  # Active | Complete | Failed
    reason: str = ""  # the Failed condition's reason (BackoffLimitExceeded, PodFailurePolicy, ...)
    owner_uid: str | None = None
    summary: str | None = None  # its pod's termination message, read once it has finished

    @classmethod
    def from_body(cls, job: dict) -> "JobView":
        meta, status = job["metadata"], job.get("status") or {}
        state, reason = "Active", ""
        for condition in status.get("conditions") or []:
            if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
                state, reason = condition["type"], condition.get("reason") or ""
        return cls(name=meta["name"], uid=meta.get("uid", ""), step=int((meta.get("labels") or {})[STEP_LABEL]),
                   state=state, reason=reason,
                   owner_uid=next((o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("controller")),
                                  None))

    @property
    def finished(self) -> bool:
        return self.state != "Active"


def awaiting_summary(status: BloomRunStatus, jobs: list[JobView]) -> list[JobView]:
    """Finished Jobs whose outcome is not recorded yet: the controller reads their pods'
    termination messages (one list call each, once) before planning."""
    running = set(status.evaluation.running) if status.evaluation else set()
    return [job for job in jobs if job.finished and job.step in running]


# ---------------------------------------------------------------------------- the Job


def job_name(run: Run, step: int) -> str:
    return desired._dns_label(f"{run.name}-eval-{step}")


def eval_gpus(run: Run) -> int:
    config = run.spec.eval
    return config.gpus if config.gpus is not None else (1 if run.spec.gpus_per_node else 0)


def checkpoint_path(run: Run, step: int) -> PurePosixPath:
    return desired.run_checkpoint_dir(run) / step_dir_name(step)


def task_data_dir(run: Run) -> str | None:
    """Where the pod finds the task data: the claim's mount, else a path on the data volume
    (relative to its mountPath, as the data paths are) or in the image."""
    config, spec = run.spec.eval, run.spec
    if config.task_data_dir is None:
        return None
    return resolve_path(config.task_data_dir, spec.data_volume.mount_path)


def eval_command(run: Run, step: int) -> list[str]:
    """`bloomctl eval` on the checkpoint of `step`, with the run's eval section as options (the
    workers' config.yaml, which gives the model's shape and the tokenizer, leaves it out)."""
    config = run.spec.eval
    command = ["python", "-m", "bloomrun.cli", "eval", str(checkpoint_path(run, step)),
               "--config", f"{desired.CONFIG_DIR}/{desired.CONFIG_FILE}"]
    command += ["--suite", config.suite] if config.suite else ["--tasks", *config.tasks]
    command += ["--batch-size", str(config.batch_size)]
    if config.limit is not None:
        command += ["--limit", str(config.limit)]
    if task_data_dir(run) is not None:
        command += ["--task-data-dir", task_data_dir(run)]
    return command + ["--device", "cuda" if eval_gpus(run) else "cpu", "--summary-file", SUMMARY_FILE]


def eval_env(run: Run) -> list[dict]:
    """Offline, as BigScience ran it: nothing is downloaded (docs/eval.md, staging); then the
    user's variables, which may not replace these."""
    ours = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HOME": desired.SCRATCH_DIR}
    return [{"name": k, "value": v} for k, v in ours.items()] + [
        {"name": e.name, "value": e.value} for e in run.spec.env if e.name not in ours]


def _volumes(run: Run) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts): the run's config, its own checkpoint folder (its checkpoints are
    read, and step-N.eval.json written beside them, so not read-only; the subPath keeps
    other runs' folders on a shared claim out of reach), the data volume (the tokenizer)
    and the task data read-only, scratch and /dev/shm."""
    spec, config = run.spec, run.spec.eval
    folder = desired.run_checkpoint_dir(run)
    scratch, scratch_mount = desired.scratch_volume()
    volumes = [{"name": "config", "configMap": {"name": desired.config_map_name(run)}},
               {"name": "checkpoints", "persistentVolumeClaim": {"claimName": spec.checkpoint_volume.claim_name}},
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size or desired.DEFAULT_SHM_SIZE}},
               scratch]
    mounts = [{"name": "config", "mountPath": desired.CONFIG_DIR, "readOnly": True},
              {"name": "checkpoints", "mountPath": str(folder),
               "subPath": str(folder.relative_to(spec.checkpoint_volume.mount_path))},
              {"name": "dshm", "mountPath": "/dev/shm"}, scratch_mount]
    if spec.data_volume.claim_name:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": spec.data_volume.claim_name,
                                                                   "readOnly": True}})
        mounts.append({"name": "data", "mountPath": spec.data_volume.mount_path, "readOnly": True})
    if config.task_data_claim_name:
        volumes.append({"name": "task-data", "persistentVolumeClaim": {"claimName": config.task_data_claim_name,
                                                                        "readOnly": True}})
        mounts.append({"name": "task-data", "mountPath": config.task_data_dir, "readOnly": True})
    return volumes, mounts


def job_labels(run: Run, step: int) -> dict[str, str]:
    """The Job's and its pod's: not the workers' bloomrun.io/run label, so the pod is no worker."""
    return {"app.kubernetes.io/name": "bloomrun", "app.kubernetes.io/instance": run.name,
            "app.kubernetes.io/component": COMPONENT, "app.kubernetes.io/part-of": "bloomrun",
            desired.MANAGED_BY: desired.OPERATOR, EVAL_LABEL: run.name, STEP_LABEL: str(step)}


def desired_job(run: Run, step: int) -> dict:
    """The Job that scores the checkpoint of `step`: the trainer's image, on the eval pool (or
    the run's), retried `backoffLimit` times for crashes, failed at once for bad input."""
    spec, config = run.spec, run.spec.eval
    pool, gpus = config.pool or spec.pool, eval_gpus(run)
    volumes, mounts = _volumes(run)
    resources = {kind: dict(values) for kind, values in (("requests", config.resources.requests),
                                                         ("limits", config.resources.limits)) if values}
    if gpus:
        resources.setdefault("limits", {})[desired.GPU_RESOURCE] = str(gpus)
    container = {
        "name": CONTAINER, "image": run.image, "imagePullPolicy": desired.image_pull_policy(run),
        "command": eval_command(run, step), "env": eval_env(run), "resources": resources,
        "volumeMounts": mounts, "securityContext": desired.restricted_security_context(),
        # The summary (or the error) it writes to SUMMARY_FILE; a crash leaves its log's tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec = {
        "restartPolicy": "Never",  # the Job retries, with its own backoff
        "automountServiceAccountToken": False, "enableServiceLinks": False,
        "securityContext": desired.pod_security_context(),
        "nodeSelector": dict(pool.node_selector), "tolerations": desired.pool_tolerations(pool, gpus),
        "containers": [container], "volumes": volumes,
    }
    if pool.affinity:
        pod_spec["affinity"] = pool.manifest_affinity()
    if config.priority_class_name:
        pod_spec["priorityClassName"] = config.priority_class_name
    metadata = {"name": job_name(run, step), "namespace": run.namespace, "labels": job_labels(run, step),
                "ownerReferences": [desired.owner_reference(run)]}
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
        "spec": {
            "backoffLimit": config.backoff_limit,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                      "values": [EXIT_BAD_INPUT]}},
                # A preempted or evicted pod is not the evaluation's fault: not counted.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]},
            "template": {"metadata": {"labels": job_labels(run, step)}, "spec": pod_spec},
        },
    }


# ------------------------------------------------------------------------------- plan


@dataclass
class EvalPlan:
    evaluation: Evaluation
    creates: list[dict] = field(default_factory=list)  # Job manifests, created after the status write
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def plan(run: Run, status: BloomRunStatus, jobs: list[JobView], stamp: str) -> EvalPlan | None:
    """The run's evaluation after this reconcile (`stamp`: now, RFC 3339), and the Jobs to
    create; None without spec.eval."""
    config = run.spec.eval
    if config is None:
        return None
    out = EvalPlan((status.evaluation or Evaluation()).model_copy(deep=True))
    if not run.spec.checkpoint_volume.claim_name:
        if out.evaluation.message != NO_VOLUME:
            out.events.append(("Warning", "EvalOff", NO_VOLUME))
        out.evaluation.message = NO_VOLUME
        return out
    out.evaluation.message = ""
    _observe_checkpoint(out, config, status.progress)
    own = {job.step: job for job in jobs if job.owner_uid in (None, run.uid)}
    _record_finished(out, own, stamp)
    _start_jobs(out, config, run, own)
    return out


def _observe_checkpoint(out: EvalPlan, config: RunEvalConfig, progress: Progress) -> None:
    """A checkpoint newer than the last one seen: queued when due."""
    ev, step, tokens = out.evaluation, progress.checkpoint_step, progress.checkpoint_tokens
    if step is None or (ev.seen_step is not None and step <= ev.seen_step):
        return
    if config.every_tokens and tokens is None:
        ev.message = NO_TOKENS
        return
    ev.seen_step, ev.seen_since_due = step, ev.seen_since_due + 1
    final = progress.target_steps is not None and step >= progress.target_steps
    if not (final or is_due(config, ev, tokens)):
        return
    ev.seen_since_due, ev.due_tokens = 0, tokens if tokens is not None else ev.due_tokens
    if step in ev.running or step in ev.queued:
        return
    ev.queued = [*ev.queued, step]
    if len(ev.queued) > QUEUE_MAX:
        dropped, ev.queued = ev.queued[0], ev.queued[1:]
        out.events.append(("Warning", "EvalSkipped", f"checkpoint step {dropped} not evaluated: more than "
                           f"{QUEUE_MAX} checkpoints waited for eval.maxConcurrent={config.max_concurrent} Jobs"))


def is_due(config: RunEvalConfig, ev: Evaluation, tokens: int | None) -> bool:
    """everyTokens: the checkpoint passed the next multiple of it since the last due one (the
    first checkpoint at or past each multiple, so arms compare at equal tokens); otherwise
    every everyCheckpoints-th checkpoint seen (default: each one)."""
    if config.every_tokens:
        return tokens is not None and tokens // config.every_tokens > (ev.due_tokens or 0) // config.every_tokens
    return ev.seen_since_due >= (config.every_checkpoints or 1)


def _record_finished(out: EvalPlan, jobs: dict[int, JobView], stamp: str) -> None:
    """Each finished Job's outcome, once: its step leaves `running` in this status write."""
    ev = out.evaluation
    for step in list(ev.running):
        job = jobs.get(step)
        if job is None or not job.finished:
            continue
        ev.running = [s for s in ev.running if s != step]
        report = message.decode(job.summary)
        if job.state == "Complete" and report.ok:
            _record_result(out, step, report)
        elif job.state == "Complete":  # exited 0 without a summary: nothing to show, so a failure
            _record_failure(out, job, "NoSummary", report.error, stamp)
        else:
            _record_failure(out, job, job.reason or "Failed", report.error or "the Job failed", stamp)


def _record_result(out: EvalPlan, step: int, report: message.Report) -> None:
    ev = out.evaluation
    ev.scored += 1
    if ev.step is None or step >= ev.step:  # Jobs may finish out of order: status shows the newest
        ev.step, ev.tokens, ev.mean, ev.normalised_mean = step, report.tokens, report.mean, report.normalised_mean
        ev.mean_stderr, ev.tasks, ev.task_stderr = report.mean_stderr, dict(report.accuracies), dict(report.stderrs)
    mean = "n/a" if report.mean is None else f"{report.mean:.4f}"
    if report.mean is not None and report.mean_stderr is not None:
        mean += f" ± {report.mean_stderr:.4f}"
    normalised = "n/a" if report.normalised_mean is None else f"{report.normalised_mean:.4f}"
    out.events.append(("Normal", "EvalScored", f"checkpoint step {step} ({report.tokens} tokens): mean accuracy "
                       f"{mean}, normalised {normalised} over {len(report.accuracies)} tasks"))


def _record_failure(out: EvalPlan, job: JobView, reason: str, text: str, stamp: str) -> None:
    ev = out.evaluation
    ev.failed += 1
    ev.last_failure = EvalFailure(step=job.step, job=job.name, reason=reason, message=text[:1024], time=stamp)
    out.events.append(("Warning", "EvalFailed", f"evaluation of checkpoint step {job.step} failed ({reason}): "
                       f"{text[:512]}; training is unaffected"))


def _start_jobs(out: EvalPlan, config: RunEvalConfig, run: Run, jobs: dict[int, JobView]) -> None:
    """A Job for each running step that has none observed (create-first: one that exists
    already is left alone), then queued steps while fewer than maxConcurrent run."""
    ev = out.evaluation
    out.creates += [desired_job(run, step) for step in ev.running if step not in jobs]
    while ev.queued and len(ev.running) < config.max_concurrent:
        step, ev.queued = ev.queued[0], ev.queued[1:]
        ev.running = [*ev.running, step]
        out.creates.append(desired_job(run, step))
