"""The planner: a pure function from (run, its status, the observed pods, now) to a plan.

Every trigger (create, update, resume, timer, pod events) runs `plan()` and kube.py
executes the result, so behaviour is level-based: the plan depends on what exists, never
on which event arrived. Nothing here performs I/O.

Counting failures exactly once: a failed pod's UID goes into `status.handledFailures` in
the same conditional status write (resourceVersion precondition) that bumps the restart
count, and the pod is deleted only after that write. A retry after a crash or a conflict
sees the UID and only deletes; worker pods have fixed names, so a retried create is refused
with AlreadyExists instead of making a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from bloomrun.operator import desired
from bloomrun.operator.conditions import ConditionType as C
from bloomrun.operator.conditions import set_condition
from bloomrun.operator.spec import BloomRunStatus, Failure, GpuHours, NodeCounts, WorkerRef
# How the trainer says a failure is permanent (bad config or data, another run's checkpoint;
# not a held run lock, which clears once its holder is gone): torchrun hides its exit code.
from bloomrun.trainer.train import PERMANENT_MARK

MAX_BACKOFF_S = 600
HANDLED_FAILURES_KEPT = 64
GPU_HOURS_WRITE_EVERY_S = 60  # accounting alone writes status at most once a minute
PENDING_RECHECK_S = 10
# A child applied this recently but not yet in the watch-fed view is in flight, not deleted.
INFRA_SETTLE_S = 5

# Failure classes (the `reason` label of bloomrun_operator_restarts_total).
RETRYABLE_EXIT = "RetryableExitCode"
PERMANENT_EXIT = "PermanentExitCode"
OOM_KILLED = "OOMKilled"
EVICTED = "Evicted"
NODE_LOST = "NodeLost"
UNKNOWN = "Unknown"
POD_LOST = "PodLost"  # gone without a failure the operator saw: deleted by hand, node GC
RETRYABLE_CLASSES = {RETRYABLE_EXIT, OOM_KILLED, EVICTED, NODE_LOST, UNKNOWN, POD_LOST}
BUDGET_SPENT = "GPUHourBudgetSpent"
INVALID_SPEC = "InvalidSpec"
FOREIGN_CHILD = "ForeignChild"  # a child's name is taken by an object this run does not control


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    """RFC 3339 as the operator writes it; None for absent or malformed text. Status is
    writable by others (an admin's edit, a trainer before the admission policy): a bad
    timestamp must cost at most that one value, never every reconcile of the run."""
    if not text or not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


# ------------------------------------------------------------------------ observation


@dataclass(frozen=True)
class PodView:
    """What the planner needs to know about one worker pod."""

    name: str
    uid: str
    index: int
    template_hash: str
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    deleting: bool = False
    node_name: str | None = None
    unschedulable: str | None = None  # the scheduler's message while it cannot bind the pod
    exit_code: int | None = None
    reason: str | None = None  # pod-level (Evicted) or container-level (OOMKilled) reason
    message: str = ""
    owner_uid: str | None = None

    @classmethod
    def from_body(cls, pod: dict) -> "PodView":
        meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
        labels = meta.get("labels") or {}
        unschedulable = None
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                unschedulable = condition.get("message") or condition.get("reason") or "Unschedulable"
        exit_code, reason, message = None, status.get("reason"), status.get("message") or ""
        for container in status.get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated")
            if terminated and (exit_code is None or terminated.get("exitCode")):
                exit_code = terminated.get("exitCode")
                if reason is None and terminated.get("reason") not in (None, "Error", "Completed"):
                    reason = terminated["reason"]
                message = message or terminated.get("message") or ""
        return cls(
            name=meta["name"], uid=meta.get("uid", ""), index=int(labels.get(desired.INDEX_LABEL, -1)),
            template_hash=labels.get(desired.HASH_LABEL, ""), phase=status.get("phase", "Pending"),
            deleting=meta.get("deletionTimestamp") is not None, node_name=spec.get("nodeName"),
            unschedulable=unschedulable, exit_code=exit_code, reason=reason, message=message,
            owner_uid=next((o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("controller")), None),
        )

    @property
    def live(self) -> bool:
        return not self.deleting and self.phase in ("Pending", "Running", "Unknown")


# ------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class ApplyInfra:
    objects: list[dict]
    infra_hash: str


@dataclass(frozen=True)
class CreatePod:
    manifest: dict


@dataclass(frozen=True)
class DeletePod:
    name: str
    uid: str
    reason: str
    force: bool = False  # grace 0: the node is gone, nobody will confirm a graceful stop


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    status: BloomRunStatus
    status_changed: bool
    infra: ApplyInfra | None = None
    deletes: list[DeletePod] = field(default_factory=list)
    creates: list[CreatePod] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    restart_reasons: list[str] = field(default_factory=list)  # counted restarts, for metrics
    finish_reason: str | None = None
    became_running: bool = False
    requeue_after: float | None = None


# torchrun's exit code when its workers failed for good, whatever the cause (measured with
# torch 2.15: workers exiting 2, 75 or 134 all gave 1) and on its own SIGTERM.
TORCHRUN_WORKERS_FAILED = 1


def classify(pod: PodView, known_nodes: set[str] | None, retryable_codes: list[int]) -> str | None:
    """The failure class of a pod, or None while it has not failed. A trainer's permanent
    verdict wins; otherwise torchrun giving up is retryable (a lost peer, a collective timeout,
    a transient NCCL error end the same way), as are the signal exits in `retryable_codes`."""
    if pod.phase != "Failed":
        if pod.node_name and known_nodes is not None and pod.node_name not in known_nodes:
            return NODE_LOST
        return None
    if pod.reason == "Evicted":
        return EVICTED
    if pod.reason == "OOMKilled":
        return OOM_KILLED
    if pod.reason in ("NodeLost", "Terminated", "NodeShutdown", "Shutdown"):
        return NODE_LOST
    if pod.message.startswith(PERMANENT_MARK):
        return PERMANENT_EXIT
    if pod.exit_code is None:
        return UNKNOWN
    retryable = pod.exit_code in retryable_codes or pod.exit_code == TORCHRUN_WORKERS_FAILED
    return RETRYABLE_EXIT if retryable else PERMANENT_EXIT


def backoff_seconds(base: int, restarts: int) -> float:
    return float(min(base * 2 ** max(restarts - 1, 0), MAX_BACKOFF_S)) if base else 0.0


@dataclass
class Draft:
    """A plan in the making: the steps of `plan()` read it and add to it, in order."""

    run: desired.Run
    now: datetime
    pods: list[PodView]  # the run's own workers, as observed
    status: BloomRunStatus  # the new status, edited in place
    out: Plan
    terminal: bool = False  # the run has ended, or ends in this plan
    waiting: bool = False  # a restart backoff is running

    @property
    def spec(self):
        return self.run.spec

    @property
    def stamp(self) -> str:
        return rfc3339(self.now)

    @property
    def desired_count(self) -> int:
        return 0 if self.spec.suspend else self.spec.nodes.max

    @property
    def settled(self) -> bool:
        """Whether the run has ended or is being stopped: no more restarts or creates."""
        return self.terminal or bool(self.status.stopping)

    def live(self) -> list[PodView]:
        """Workers that run or will, and that this plan does not delete."""
        deleting = {d.name for d in self.out.deletes}
        return [p for p in self.pods if p.live and p.name not in deleting]

    def delete(self, pod: PodView, reason: str, force: bool = False) -> None:
        self.out.deletes.append(DeletePod(pod.name, pod.uid, reason, force=force))

    def event(self, type_: str, reason: str, message: str) -> None:
        self.out.events.append(Event(type_, reason, message))


def plan(run: desired.Run, status: BloomRunStatus, pods: list[PodView], now: datetime,
         known_nodes: set[str] | None = None, observed_infra: set[tuple[str, str]] | None = None) -> Plan:
    """Decide what to do next. `known_nodes` None means node existence is unknown;
    `observed_infra` is the (kind, name) of the run's non-pod children that exist (None: unknown)."""
    draft = _start(run, status, pods, now)
    _apply_infrastructure(draft, observed_infra)
    _account_gpu_hours(draft.status, run.spec.gpus_per_node, now)
    _reopen_fixed_spec(draft)
    _replace_failed_workers(draft, known_nodes)
    _replace_lost_workers(draft)
    _finish_or_stop(draft)
    _delete_surplus_workers(draft)
    _create_missing_workers(draft)
    _set_phase(draft)
    _set_conditions(draft, _phase_reason(draft))
    return _complete(draft, status)


def _start(run: desired.Run, status: BloomRunStatus, pods: list[PodView], now: datetime) -> Draft:
    new = status.model_copy(deep=True)
    new.observed_generation = run.generation
    new.start_time = new.start_time or rfc3339(now)
    # A run deleted and created again under the same name must not adopt the old run's pods.
    own = [p for p in pods if 0 <= p.index and p.owner_uid in (None, run.uid)]
    return Draft(run, now, own, new, Plan(status=new, status_changed=False))


def _apply_infrastructure(d: Draft, observed: set[tuple[str, str]] | None) -> None:
    """Children other than pods: applied when the spec they derive from changed, or when one
    is missing (deleted by hand): level-based like the pods."""
    infra_hash = desired.infra_hash(d.run)
    missing = _missing_infra(d.run, d.status, observed, d.now)
    if d.status.infra_hash == infra_hash and not missing:
        return
    d.out.infra = ApplyInfra(desired.desired_infra(d.run), infra_hash)
    d.status.infra_hash, d.status.infra_applied_at = infra_hash, d.stamp
    if missing:
        d.event("Warning", "ChildrenRecreated",
                "recreating missing " + ", ".join(f"{k} {n}" for k, n in sorted(missing)))


def _reopen_fixed_spec(d: Draft) -> None:
    """A run refused for an invalid spec or a taken child name starts over (the spec may pass
    now, the foreign object may be gone: the controller checks again); others that ended stay ended."""
    if d.status.phase == "Failed" and _reason_of(d.status, "Failed") in (INVALID_SPEC, FOREIGN_CHILD):
        d.status.phase, d.status.completion_time = None, None
    d.terminal = d.status.phase in ("Succeeded", "Failed")


def _replace_failed_workers(d: Draft, known_nodes: set[str] | None) -> None:
    """Failed workers: count each once, then delete it so its name can be reused."""
    for pod in d.pods:
        failure = classify(pod, known_nodes, d.spec.restart_policy.retryable_exit_codes)
        if failure is None or pod.deleting and failure != NODE_LOST:
            continue
        d.delete(pod, failure, force=failure == NODE_LOST)
        if pod.uid not in d.status.handled_failures and not d.settled:
            _count_failure(d, pod.name, pod.uid, failure, pod.exit_code, pod.message)


def _replace_lost_workers(d: Draft) -> None:
    """Workers the operator saw and did not delete, now gone: someone deleted them, or the node
    GC did while the operator was down. Pods the operator deletes leave `workers` in the same
    status write that precedes the delete, so they are never counted here."""
    present = {p.uid for p in d.pods}
    for ref in d.status.workers:
        if ref.uid in present or ref.uid in d.status.handled_failures or d.settled or d.spec.suspend:
            continue
        _count_failure(d, ref.name, ref.uid, POD_LOST, None,
                       "the pod is gone, deleted by someone other than the operator")


def _finish_or_stop(d: Draft) -> None:
    """A worker that exited 0 ends the run. The GPU-hour budget stops it cleanly (the trainer
    checkpoints on SIGTERM), and it succeeds once no worker is left."""
    new = d.status
    finished = next((p for p in d.pods if p.phase == "Succeeded" and not p.deleting), None)
    # A worker stopped on purpose (new.stopping) is not the end of training.
    if finished and not d.terminal and not new.stopping:
        _finish(d, "Succeeded", "TrainingComplete", f"worker {finished.name} exited 0")
    budget = d.spec.budget.gpu_hours
    if budget and not d.settled and new.gpu_hours.used >= budget:
        new.stopping = BUDGET_SPENT
        d.event("Normal", BUDGET_SPENT, f"{new.gpu_hours.used:.2f} of {budget} GPU-hours used: "
                "checkpointing and stopping")
    if new.stopping and not d.terminal and not any(p.phase in ("Pending", "Running", "Unknown") for p in d.pods):
        _finish(d, "Succeeded", new.stopping, f"stopped after {new.gpu_hours.used:.2f} GPU-hours (budget {budget})")


def _delete_surplus_workers(d: Draft) -> None:
    """Workers that should not exist: run over, suspended, stopping, scaled down, or stale."""
    template = desired.template_hash(d.run)
    for pod in d.live():
        reason = None
        if d.terminal and d.status.phase == "Failed":
            reason = "RunFailed"  # the others would wait in the rendezvous forever
        elif d.spec.suspend:
            reason = "Suspended"
        elif d.status.stopping:
            reason = d.status.stopping
        elif pod.index >= d.desired_count:
            reason = "ScaledDown"
        elif pod.template_hash != template and not d.terminal:
            reason = "SpecChanged"
        if reason:
            d.delete(pod, reason)


def _create_missing_workers(d: Draft) -> None:
    """Missing workers: created once the backoff has passed and the old pod is gone."""
    backoff_until = parse_time(d.status.backoff_until)
    d.waiting = backoff_until is not None and backoff_until > d.now
    if d.waiting:
        d.out.requeue_after = (backoff_until - d.now).total_seconds()
        return
    if d.settled:
        return
    taken = {p.name for p in d.pods}
    for index in range(d.desired_count):
        if desired.worker_name(d.run, index) not in taken:
            d.out.creates.append(CreatePod(desired.desired_worker(d.run, index)))


def _complete(d: Draft, old: BloomRunStatus) -> Plan:
    """The workers to watch for loss, and whether the status must be written at all."""
    d.status.workers = _workers_to_watch(d.pods, old, d.out.deletes)
    d.out.status_changed = _material_change(old.model_dump(), d.status.model_dump(), d.now, old)
    if not d.out.status_changed:
        d.out.status = old  # do not advance the GPU-hour accounting without writing it
    return d.out


def _count_failure(d: Draft, pod_name: str, uid: str, failure: str, exit_code: int | None, message: str) -> None:
    """Record one failure (restart, budget, backoff, event); the run ends when it is permanent
    or the restarts are spent."""
    new, policy = d.status, d.spec.restart_policy
    new.handled_failures = [*new.handled_failures, uid][-HANDLED_FAILURES_KEPT:]
    new.last_failure = Failure(pod=pod_name, pod_uid=uid, reason=failure, exit_code=exit_code,
                               message=message[:512], time=d.stamp)
    detail = f"worker {pod_name} failed: {failure}" + (f" (exit code {exit_code})" if exit_code is not None else "")
    if failure == PERMANENT_EXIT:
        _finish(d, "Failed", PERMANENT_EXIT, detail + "; not retryable")
        return
    new.restarts += 1
    new.restarts_by_reason = {**new.restarts_by_reason, failure: new.restarts_by_reason.get(failure, 0) + 1}
    d.out.restart_reasons.append(failure)
    if new.restarts > policy.max_restarts:
        _finish(d, "Failed", "RestartLimitExceeded",
                f"{detail}; restart {new.restarts} exceeds maxRestarts {policy.max_restarts}")
        return
    delay = backoff_seconds(policy.backoff_seconds, new.restarts)
    new.backoff_until = rfc3339(d.now + timedelta(seconds=delay))
    d.event("Warning", "WorkerFailed", f"{detail}; replacing it in {delay:.0f}s "
            f"(restart {new.restarts} of {policy.max_restarts})")


def _missing_infra(run: desired.Run, status: BloomRunStatus, observed: set[tuple[str, str]] | None,
                   now: datetime) -> set[tuple[str, str]]:
    applied = parse_time(status.infra_applied_at)
    if observed is None or status.infra_hash is None or (
            applied is not None and (now - applied).total_seconds() < INFRA_SETTLE_S):
        return set()
    return desired.infra_names(run) - observed


def _workers_to_watch(pods: list[PodView], old: BloomRunStatus, deletes: list[DeletePod]) -> list[WorkerRef]:
    """Pods whose disappearance would be a loss: observed, not deleted by this plan, and not
    already being deleted unless that deletion is someone else's (they were watched before)."""
    ours = {d.uid for d in deletes}
    watched = {ref.uid for ref in old.workers}
    return [WorkerRef(name=p.name, uid=p.uid) for p in sorted(pods, key=lambda p: p.index)
            if p.uid not in ours and (not p.deleting or p.uid in watched)
            and p.phase in ("Pending", "Running", "Unknown")]


def _account_gpu_hours(status: BloomRunStatus, gpus_per_node: int, now: datetime) -> None:
    """Integrate ready workers x GPUs over time; `nodes.ready` is what ran since `accountedAt`."""
    since = parse_time(status.gpu_hours.accounted_at)
    used = status.gpu_hours.used
    if since is not None and now > since:
        used += status.nodes.ready * gpus_per_node * (now - since).total_seconds() / 3600
    status.gpu_hours = GpuHours(used=round(used, 6), accounted_at=rfc3339(now))


def _finish(d: Draft, phase: str, reason: str, message: str) -> None:
    status = d.status
    status.phase = phase
    status.message = message
    status.completion_time = d.stamp
    status.backoff_until = None
    d.terminal = True
    d.out.finish_reason = reason
    d.event("Warning" if phase == "Failed" else "Normal", reason, message)


def _set_phase(d: Draft) -> None:
    """Phase, message and node counts from the workers left running; an Event when the phase
    changes; a quick recheck while workers are pending."""
    status, spec, live = d.status, d.spec, d.live()
    running = [p for p in live if p.phase == "Running"]
    unschedulable = _unschedulable(d)
    previous_phase = status.phase
    status.nodes = NodeCounts(desired=d.desired_count, ready=len(running), display=f"{len(running)}/{d.desired_count}")
    if d.terminal:
        pass  # _finish wrote phase and message
    elif spec.suspend:
        status.phase, status.message = "Suspended", "spec.suspend is true; workers deleted"
    elif len(running) >= spec.nodes.min:
        status.phase = "Running"
        status.message = f"{len(running)} of {d.desired_count} workers running"
        if status.stopping:
            status.message = f"stopping: {status.stopping}"
        if len(running) >= d.desired_count and status.running_time is None:
            status.running_time = d.stamp
            d.out.became_running = True
        status.backoff_until = None if not d.waiting else status.backoff_until
    elif d.waiting or d.out.restart_reasons or (previous_phase == "Restarting" and not unschedulable):
        status.phase = "Restarting"
        status.message = (f"replacing failed worker {status.last_failure.pod} ({status.last_failure.reason})"
                          if status.last_failure else "replacing failed workers")
    else:
        status.phase = "Pending"
        status.message = (f"{len(running)} of at least {spec.nodes.min} workers running"
                          + (f"; scheduler: {unschedulable}" if unschedulable else ""))
    if status.phase != previous_phase and not d.terminal:
        d.event("Normal", status.phase, status.message)
    if not d.terminal and not d.waiting and live and len(live) > len(running):
        d.out.requeue_after = min(d.out.requeue_after or PENDING_RECHECK_S, PENDING_RECHECK_S)


def _phase_reason(d: Draft) -> str:
    """The reason the condition of the current phase carries."""
    status = d.status
    if d.terminal:
        return d.out.finish_reason or _reason_of(status, status.phase)
    if status.stopping and not d.spec.suspend:
        return status.stopping
    if status.phase == "Pending":
        return "Unschedulable" if _unschedulable(d) else "WaitingForWorkers"
    return status.phase


def _unschedulable(d: Draft) -> str | None:
    """The scheduler's message for the first live worker it cannot place."""
    return next((p.unschedulable for p in d.live() if p.unschedulable), None)


def _set_conditions(d: Draft, reason: str) -> None:
    """One condition per phase (true for the current one), plus Created and Scheduled."""
    status, spec, gen, stamp = d.status, d.spec, d.run.generation, d.stamp
    bound = [p for p in d.live() if p.node_name]
    unschedulable = _unschedulable(d)
    conds = set_condition(status.conditions, C.CREATED, status.infra_hash is not None, "ChildrenApplied",
                          "Service, ConfigMap and trainer RBAC applied", gen, stamp)
    scheduled = len(bound) >= spec.nodes.min and not spec.suspend
    conds = set_condition(conds, C.SCHEDULED, scheduled, "Scheduled" if scheduled else
                          ("Unschedulable" if unschedulable else "WaitingForWorkers"),
                          f"{len(bound)} of {d.desired_count} workers bound" +
                          (f"; scheduler: {unschedulable}" if unschedulable and not scheduled else ""), gen, stamp)
    for kind, phase in ((C.RUNNING, "Running"), (C.RESTARTING, "Restarting"), (C.SUSPENDED, "Suspended"),
                        (C.SUCCEEDED, "Succeeded"), (C.FAILED, "Failed")):
        active = status.phase == phase
        conds = set_condition(conds, kind, active, reason if active else f"Not{phase}",
                              status.message if active else "", gen, stamp)
    status.conditions = conds


def _reason_of(status: BloomRunStatus, phase: str | None) -> str:
    condition = next((c for c in status.conditions if c.type == phase and c.status == "True"), None)
    return condition.reason if condition else (phase or "Unknown")


def _material_change(before: dict, after: dict, now: datetime, old: BloomRunStatus) -> bool:
    """Whether the status must be written: anything but the GPU-hour clock moved, or a minute passed."""
    strip = lambda s: {k: v for k, v in s.items() if k not in ("gpu_hours", "progress")}  # noqa: E731
    if strip(before) != strip(after):
        return True
    since = parse_time(old.gpu_hours.accounted_at)
    return since is None or (now - since).total_seconds() >= GPU_HOURS_WRITE_EVERY_S


def refuse(status: BloomRunStatus, message: str, reason: str, generation: int, now: datetime) -> BloomRunStatus:
    """The status of a run that cannot proceed as specified (a stored spec that fails
    validation, a child name taken by a foreign object): Failed, with the reason."""
    new = status.model_copy(deep=True)
    stamp = rfc3339(now)
    new.phase, new.message, new.observed_generation = "Failed", message, generation
    new.conditions = set_condition(new.conditions, C.FAILED, True, reason, message, generation, stamp)
    return new
