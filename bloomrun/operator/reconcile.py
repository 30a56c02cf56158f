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


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


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


def classify(pod: PodView, known_nodes: set[str] | None, retryable_codes: list[int]) -> str | None:
    """The failure class of a pod, or None while it has not failed."""
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
    if pod.exit_code is None:
        return UNKNOWN
    return RETRYABLE_EXIT if pod.exit_code in retryable_codes else PERMANENT_EXIT


def backoff_seconds(base: int, restarts: int) -> float:
    return float(min(base * 2 ** max(restarts - 1, 0), MAX_BACKOFF_S)) if base else 0.0


def plan(run: desired.Run, status: BloomRunStatus, pods: list[PodView], now: datetime,
         known_nodes: set[str] | None = None, observed_infra: set[tuple[str, str]] | None = None) -> Plan:
    """Decide what to do next. `known_nodes` None means node existence is unknown;
    `observed_infra` is the (kind, name) of the run's non-pod children that exist (None: unknown)."""
    spec = run.spec
    before = status.model_dump()
    new = status.model_copy(deep=True)
    out = Plan(status=new, status_changed=False)
    stamp = rfc3339(now)
    new.observed_generation = run.generation
    new.start_time = new.start_time or stamp
    # A run deleted and created again under the same name must not adopt the old run's pods.
    pods = [p for p in pods if 0 <= p.index and p.owner_uid in (None, run.uid)]
    desired_count = 0 if spec.suspend else spec.nodes.max
    template = desired.template_hash(run)

    # Children other than pods: applied when the spec they derive from changed, or when one
    # is missing (deleted by hand): level-based like the pods.
    infra_hash = desired.infra_hash(run)
    missing = _missing_infra(run, new, observed_infra, now)
    if new.infra_hash != infra_hash or missing:
        out.infra = ApplyInfra(desired.desired_infra(run), infra_hash)
        new.infra_hash, new.infra_applied_at = infra_hash, stamp
        if missing:
            out.events.append(Event("Warning", "ChildrenRecreated",
                                    "recreating missing " + ", ".join(f"{k} {n}" for k, n in sorted(missing))))

    _account_gpu_hours(new, spec.gpus_per_node, now)
    if new.phase == "Failed" and _reason_of(new, "Failed") == INVALID_SPEC:
        new.phase, new.completion_time = None, None  # the spec was fixed: start over
    terminal = new.phase in ("Succeeded", "Failed")

    # Failed workers: count each once, then delete it so its name can be reused.
    for pod in pods:
        failure = classify(pod, known_nodes, spec.restart_policy.retryable_exit_codes)
        if failure is None or pod.deleting and failure != NODE_LOST:
            continue
        out.deletes.append(DeletePod(pod.name, pod.uid, failure, force=failure == NODE_LOST))
        if pod.uid in new.handled_failures or terminal or new.stopping:
            continue
        terminal = _count_failure(new, out, spec, pod.name, pod.uid, failure, pod.exit_code, pod.message, now)

    # Workers the operator saw and did not delete, now gone: someone deleted them, or the node
    # GC did while the operator was down. Pods the operator deletes leave `workers` in the same
    # status write that precedes the delete, so they are never counted here.
    present = {p.uid for p in pods}
    for ref in new.workers:
        if ref.uid in present or ref.uid in new.handled_failures or terminal or new.stopping or spec.suspend:
            continue
        terminal = _count_failure(new, out, spec, ref.name, ref.uid, POD_LOST, None,
                                  "the pod is gone, deleted by someone other than the operator", now)

    finished = next((p for p in pods if p.phase == "Succeeded" and not p.deleting), None)
    if finished and not terminal:
        if new.stopping:
            pass  # a worker stopped on purpose: not the end of training, handled below
        else:
            _finish(new, out, "Succeeded", "TrainingComplete", f"worker {finished.name} exited 0", stamp)
            terminal = True

    deleting_names = {d.name for d in out.deletes}
    live = [p for p in pods if p.live and p.name not in deleting_names]

    # The GPU-hour budget stops the run cleanly: the trainer checkpoints on SIGTERM.
    budget = spec.budget.gpu_hours
    if budget and not terminal and not new.stopping and new.gpu_hours.used >= budget:
        new.stopping = BUDGET_SPENT
        out.events.append(Event("Normal", BUDGET_SPENT,
                                f"{new.gpu_hours.used:.2f} of {budget} GPU-hours used: checkpointing and stopping"))
    if new.stopping and not terminal and not any(p.phase in ("Pending", "Running", "Unknown") for p in pods):
        _finish(new, out, "Succeeded", new.stopping, f"stopped after {new.gpu_hours.used:.2f} GPU-hours "
                f"(budget {budget})", stamp)
        terminal = True

    # Workers that should not exist: run over, suspended, stopping, scaled down, or stale.
    for pod in live:
        reason = None
        if terminal and new.phase == "Failed":
            reason = "RunFailed"  # the others would wait in the rendezvous forever
        elif spec.suspend:
            reason = "Suspended"
        elif new.stopping:
            reason = new.stopping
        elif pod.index >= desired_count:
            reason = "ScaledDown"
        elif pod.template_hash != template and not terminal:
            reason = "SpecChanged"
        if reason:
            out.deletes.append(DeletePod(pod.name, pod.uid, reason))
            deleting_names.add(pod.name)
    live = [p for p in live if p.name not in deleting_names]

    # worker-0 hosts the rendezvous (its stable name is the endpoint): if it cannot be placed
    # while others run, the survivors can never re-rendezvous. Give it the node of the
    # highest-index running worker, which is recreated and waits instead.
    host = next((p for p in live if p.index == 0), None)
    movers = sorted((p for p in live if p.index > 0 and p.phase == "Running"), key=lambda p: p.index)
    if host and host.unschedulable and host.phase == "Pending" and movers and not terminal:
        mover = movers[-1]
        out.deletes.append(DeletePod(mover.name, mover.uid, "RendezvousHostMoved"))
        out.events.append(Event("Normal", "RendezvousHostMoved",
                                f"{mover.name} makes room for {host.name}, which hosts the rendezvous"))
        live = [p for p in live if p.name != mover.name]

    # Missing workers: created once the backoff has passed and the old pod is gone.
    backoff_until = parse_time(new.backoff_until)
    waiting = backoff_until is not None and backoff_until > now
    taken = {p.name for p in pods}
    if not terminal and not new.stopping and not waiting:
        for index in range(desired_count):
            if desired.worker_name(run, index) not in taken:
                out.creates.append(CreatePod(desired.desired_worker(run, index)))
    if waiting:
        out.requeue_after = (backoff_until - now).total_seconds()

    _set_phase(run, new, out, live, pods, now, stamp, terminal, waiting)
    new.workers = _workers_to_watch(pods, status, out.deletes)
    out.status_changed = _material_change(before, new.model_dump(), now, status)
    if not out.status_changed:
        out.status = status  # do not advance the GPU-hour accounting without writing it
    return out


def _count_failure(new: BloomRunStatus, out: Plan, spec, pod_name: str, uid: str, failure: str,
                   exit_code: int | None, message: str, now: datetime) -> bool:
    """Record one failure (restart, budget, backoff, event); True when it ends the run."""
    stamp = rfc3339(now)
    new.handled_failures = [*new.handled_failures, uid][-HANDLED_FAILURES_KEPT:]
    new.last_failure = Failure(pod=pod_name, pod_uid=uid, reason=failure, exit_code=exit_code,
                               message=message[:512], time=stamp)
    detail = f"worker {pod_name} failed: {failure}" + (f" (exit code {exit_code})" if exit_code is not None else "")
    if failure == PERMANENT_EXIT:
        _finish(new, out, "Failed", PERMANENT_EXIT, detail + "; not retryable", stamp)
        return True
    new.restarts += 1
    new.restarts_by_reason = {**new.restarts_by_reason, failure: new.restarts_by_reason.get(failure, 0) + 1}
    out.restart_reasons.append(failure)
    if new.restarts > spec.restart_policy.max_restarts:
        _finish(new, out, "Failed", "RestartLimitExceeded",
                f"{detail}; restart {new.restarts} exceeds maxRestarts {spec.restart_policy.max_restarts}", stamp)
        return True
    delay = backoff_seconds(spec.restart_policy.backoff_seconds, new.restarts)
    new.backoff_until = rfc3339(now + timedelta(seconds=delay))
    out.events.append(Event("Warning", "WorkerFailed", f"{detail}; replacing it in {delay:.0f}s "
                            f"(restart {new.restarts} of {spec.restart_policy.max_restarts})"))
    return False


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


def _finish(status: BloomRunStatus, out: Plan, phase: str, reason: str, message: str, stamp: str) -> None:
    status.phase = phase
    status.message = message
    status.completion_time = stamp
    status.backoff_until = None
    out.finish_reason = reason
    out.events.append(Event("Warning" if phase == "Failed" else "Normal", reason, message))


def _set_phase(run: desired.Run, status: BloomRunStatus, out: Plan, live: list[PodView], pods: list[PodView],
               now: datetime, stamp: str, terminal: bool, waiting: bool) -> None:
    spec = run.spec
    running = [p for p in live if p.phase == "Running"]
    bound = [p for p in live if p.node_name]
    desired_count = 0 if spec.suspend else spec.nodes.max
    previous_phase = status.phase
    status.nodes = NodeCounts(desired=desired_count, ready=len(running), display=f"{len(running)}/{desired_count}")
    unschedulable = next((p.unschedulable for p in live if p.unschedulable), None)

    if terminal:
        reason = out.finish_reason or _reason_of(status, status.phase)
    elif spec.suspend:
        status.phase, reason, status.message = "Suspended", "Suspended", "spec.suspend is true; workers deleted"
    elif len(running) >= spec.nodes.min:
        status.phase, reason = "Running", "Running"
        status.message = f"{len(running)} of {desired_count} workers running"
        if status.stopping:
            status.message = f"stopping: {status.stopping}"
        if len(running) >= desired_count and status.running_time is None:
            status.running_time = stamp
            out.became_running = True
        status.backoff_until = None if not waiting else status.backoff_until
    elif waiting or out.restart_reasons or (previous_phase == "Restarting" and not unschedulable):
        status.phase, reason = "Restarting", "Restarting"
        status.message = (f"replacing failed worker {status.last_failure.pod} ({status.last_failure.reason})"
                          if status.last_failure else "replacing failed workers")
    else:
        status.phase = "Pending"
        reason = "Unschedulable" if unschedulable else "WaitingForWorkers"
        status.message = (f"{len(running)} of at least {spec.nodes.min} workers running"
                          + (f"; scheduler: {unschedulable}" if unschedulable else ""))
    if not terminal and status.stopping and not spec.suspend:
        reason = status.stopping

    if status.phase != previous_phase and not terminal:
        kind = "Normal"
        out.events.append(Event(kind, status.phase, status.message))
    if not terminal and not waiting and live and len(live) > len(running):
        out.requeue_after = min(out.requeue_after or PENDING_RECHECK_S, PENDING_RECHECK_S)

    gen, conds = run.generation, status.conditions
    conds = set_condition(conds, C.CREATED, status.infra_hash is not None, "ChildrenApplied",
                          "Service, ConfigMap and trainer RBAC applied", gen, stamp)
    scheduled = len(bound) >= spec.nodes.min and not spec.suspend
    conds = set_condition(conds, C.SCHEDULED, scheduled, "Scheduled" if scheduled else
                          ("Unschedulable" if unschedulable else "WaitingForWorkers"),
                          f"{len(bound)} of {desired_count} workers bound" +
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


def refuse_invalid_spec(status: BloomRunStatus, message: str, generation: int, now: datetime) -> BloomRunStatus:
    """The status of a run whose stored spec fails validation: Failed, naming the field."""
    new = status.model_copy(deep=True)
    stamp = rfc3339(now)
    new.phase, new.message, new.observed_generation = "Failed", message, generation
    new.conditions = set_condition(new.conditions, C.FAILED, True, INVALID_SPEC, message, generation, stamp)
    return new
