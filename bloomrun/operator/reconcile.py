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

from bloomrun.operator import desired, evaluation
from bloomrun.operator import goodput
from bloomrun.operator.conditions import ConditionType as C
from bloomrun.operator.conditions import set_condition
from bloomrun.operator.spec import BloomRunSpec, BloomRunStatus, Failure, GpuHours, Layout, NodeCounts, WorkerRef
# How the trainer says a failure is permanent (bad config or data, another run's checkpoint;
# not a held run lock, which clears once its holder is gone) or that a rank of the pod hung
# (its watchdog): torchrun hides the trainer's exit code, the termination message says it.
from bloomrun.trainer.train import HUNG_MARK, PERMANENT_MARK

MAX_BACKOFF_S = 600
HANDLED_FAILURES_KEPT = 64
GPU_HOURS_WRITE_EVERY_S = 60  # accounting alone writes status at most once a minute
PENDING_RECHECK_S = 10
# A child applied this recently but not yet in the watch-fed view is in flight, not deleted.
INFRA_SETTLE_S = 5
# A worker being deleted whose kubelet cannot confirm it (its node NotReady or unreachable)
# stays Terminating forever, and its fixed name blocks its replacement (issue 19: a run held
# at 1/2 for 10 simulated hours). Past its grace period, with the node not Ready, for this
# long, the operator deletes it with grace 0 (see `stuck_terminating`).
STUCK_TERMINATING_S = 60

# Failure classes (the `reason` label of bloomrun_operator_restarts_total).
RETRYABLE_EXIT = "RetryableExitCode"
PERMANENT_EXIT = "PermanentExitCode"
OOM_KILLED = "OOMKilled"
EVICTED = "Evicted"
NODE_LOST = "NodeLost"
UNKNOWN = "Unknown"
POD_LOST = "PodLost"  # gone without a failure the operator saw: deleted by hand, node GC
HUNG = "Hung"  # the trainer's watchdog ended the pod: a rank of it made no progress
RETRYABLE_CLASSES = {RETRYABLE_EXIT, OOM_KILLED, EVICTED, NODE_LOST, UNKNOWN, POD_LOST, HUNG}
# A container's end as its runtime reports it when the container died with its machine: a
# restarted containerd finds the task gone and reports exit code 255 with reason "Unknown"
# (its CRI restore path), the kubelet "ContainerStatusUnknown" when it cannot find the
# container at all. The exit code is not the trainer's, so it says nothing about the run
# (seen on real pods: a lost node's worker came back as 255 and failed the run as permanent).
RUNTIME_LOST_REASONS = {"Unknown", "ContainerStatusUnknown"}
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
    deletion_deadline: datetime | None = None  # deletionTimestamp: the delete request + its grace
    node_name: str | None = None
    unschedulable: str | None = None  # the scheduler's message while it cannot bind the pod
    exit_code: int | None = None
    reason: str | None = None  # pod-level (Evicted) or container-level (OOMKilled) reason
    message: str = ""
    owner_uid: str | None = None
    started_at: datetime | None = None  # its first container started (running or since ended)
    finished_at: datetime | None = None  # its last container ended, once all have

    @classmethod
    def from_body(cls, pod: dict) -> "PodView":
        meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
        labels = meta.get("labels") or {}
        unschedulable = None
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                unschedulable = condition.get("message") or condition.get("reason") or "Unschedulable"
        exit_code, reason, message = None, status.get("reason"), status.get("message") or ""
        containers = status.get("containerStatuses") or []
        for container in containers:
            terminated = (container.get("state") or {}).get("terminated")
            if terminated and (exit_code is None or terminated.get("exitCode")):
                exit_code = terminated.get("exitCode")
                if reason is None and terminated.get("reason") not in (None, "Error", "Completed"):
                    reason = terminated["reason"]
                message = message or terminated.get("message") or ""
        return cls(
            name=meta["name"], uid=meta.get("uid", ""), index=int(labels.get(desired.INDEX_LABEL, -1)),
            template_hash=labels.get(desired.HASH_LABEL, ""), phase=status.get("phase", "Pending"),
            deleting=meta.get("deletionTimestamp") is not None,
            deletion_deadline=parse_time(meta.get("deletionTimestamp")), node_name=spec.get("nodeName"),
            unschedulable=unschedulable, exit_code=exit_code, reason=reason, message=message,
            owner_uid=next((o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("controller")), None),
            **_container_times(containers),
        )

    @property
    def live(self) -> bool:
        return not self.deleting and self.phase in ("Pending", "Running", "Unknown")


def _container_times(containers: list[dict]) -> dict:
    """When the pod's containers began to run and, once every one has ended, when the last
    did: what the pod held its node's GPUs for, as the kubelet reports it."""
    states = [c.get("state") or {} for c in containers]
    starts = [parse_time((s.get("running") or s.get("terminated") or {}).get("startedAt")) for s in states]
    ends = [parse_time((s.get("terminated") or {}).get("finishedAt")) for s in states]
    started = min((t for t in starts if t is not None), default=None)
    finished = max(ends) if ends and all(t is not None for t in ends) else None
    return {"started_at": started, "finished_at": finished}


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
    eval_jobs: list[dict] = field(default_factory=list)  # evaluation Jobs to create (evaluation.py)
    events: list[Event] = field(default_factory=list)
    restart_reasons: list[str] = field(default_factory=list)  # counted restarts, for metrics
    finish_reason: str | None = None
    became_running: bool = False
    requeue_after: float | None = None


# torchrun's exit code when its workers failed for good, whatever the cause (measured with
# torch 2.15: workers exiting 2, 75 or 134 all gave 1) and on its own SIGTERM.
TORCHRUN_WORKERS_FAILED = 1


def stuck_terminating(pod: PodView, unready_since: dict[str, datetime], now: datetime) -> bool:
    """Whether `pod` is being deleted, its grace period ended STUCK_TERMINATING_S ago or more, and
    its node has not been Ready for as long: no kubelet will confirm the deletion, so only a
    deletion with grace 0 frees the name. What `kubectl delete --force` does by hand and
    StatefulSet users are told to do (the StatefulSet controller never does it, to keep at most
    one pod per identity); here a stale trainer left running on a partitioned node is fenced by
    the checkpoint folder's lock (bloomrun.trainer.runlock: a new rank 0 waits, retried, while
    it is held), so the run takes the risk rather than stay short of a node until someone
    notices. A pod on a Ready node is never forced."""
    since = unready_since.get(pod.node_name or "")
    bound = timedelta(seconds=STUCK_TERMINATING_S)
    return (pod.deleting and pod.deletion_deadline is not None and since is not None
            and now - pod.deletion_deadline >= bound and now - since >= bound)


def node_unready_since(node: dict, now: datetime) -> datetime | None:
    """Since when a Node (its API object) has not been Ready (False or Unknown: the node
    controller's verdict when its kubelet stops reporting); None while Ready."""
    ready = next((c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready is not None and ready.get("status") == "True":
        return None
    return parse_time((ready or {}).get("lastTransitionTime")) or now


def classify(pod: PodView, known_nodes: set[str] | None, retryable_codes: list[int],
             unready_since: dict[str, datetime] | None = None, now: datetime | None = None) -> str | None:
    """The failure class of a pod, or None while it has not failed. A trainer's permanent
    verdict wins; otherwise torchrun giving up is retryable (a lost peer, a collective timeout,
    a transient NCCL error end the same way), as are the signal exits in `retryable_codes`.
    A pod stuck Terminating on a node that is not Ready is lost with its node."""
    if unready_since and now is not None and stuck_terminating(pod, unready_since, now):
        return NODE_LOST
    if pod.phase != "Failed":
        if pod.node_name and known_nodes is not None and pod.node_name not in known_nodes:
            return NODE_LOST
        return None
    if pod.reason == "Evicted":
        return EVICTED
    if pod.reason == "OOMKilled":
        return OOM_KILLED
    if pod.reason in ("NodeLost", "Terminated", "NodeShutdown", "Shutdown") or pod.reason in RUNTIME_LOST_REASONS:
        return NODE_LOST
    if pod.message.startswith(PERMANENT_MARK):
        return PERMANENT_EXIT
    if pod.message.startswith(HUNG_MARK):
        return HUNG
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
         known_nodes: set[str] | None = None, observed_infra: set[tuple[str, str]] | None = None,
         eval_jobs: list[evaluation.JobView] | None = None,
         unready_since: dict[str, datetime] | None = None) -> Plan:
    """Decide what to do next. `known_nodes` None means node existence is unknown;
    `observed_infra` is the (kind, name) of the run's non-pod children that exist (None: unknown);
    `eval_jobs` the run's evaluation Jobs, finished ones with their pod's termination message;
    `unready_since` the nodes of pods being deleted that are not Ready, and since when."""
    draft = _start(run, status, pods, now)
    _apply_infrastructure(draft, observed_infra)
    _account_gpu_hours(draft)
    _account_goodput(draft)
    _reopen_fixed_spec(draft)
    _replace_failed_workers(draft, known_nodes, unready_since or {})
    _replace_lost_workers(draft)
    _finish_or_stop(draft)
    _delete_surplus_workers(draft)
    _create_missing_workers(draft)
    _evaluate_checkpoints(draft, eval_jobs or [])
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


def _replace_failed_workers(d: Draft, known_nodes: set[str] | None, unready_since: dict[str, datetime]) -> None:
    """Failed workers: count each once, then delete it so its name can be reused. A worker lost
    with its node is deleted with grace 0 (nobody will confirm a graceful stop), also one already
    being deleted; that one counts as a failure only if someone else deleted it (a watched worker)."""
    watched = {ref.uid for ref in d.status.workers}
    for pod in d.pods:
        failure = classify(pod, known_nodes, d.spec.restart_policy.retryable_exit_codes, unready_since, d.now)
        if failure is None or pod.deleting and failure != NODE_LOST:
            continue
        d.delete(pod, failure, force=failure == NODE_LOST)
        if pod.deleting and stuck_terminating(pod, unready_since, d.now):
            d.event("Warning", "WorkerForceDeleted",
                    f"worker {pod.name} was still Terminating {_ago(d.now, pod.deletion_deadline)} after its "
                    f"grace period on node {pod.node_name}, not Ready for {_ago(d.now, unready_since[pod.node_name])}: "
                    "deleted with grace 0 so that its replacement can take its name")
        counted = not pod.deleting or pod.uid in watched
        if counted and pod.uid not in d.status.handled_failures and not d.settled:
            _count_failure(d, pod.name, pod.uid, failure, pod.exit_code, pod.message)


def _ago(now: datetime, then: datetime) -> str:
    return f"{(now - then).total_seconds():.0f}s"


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


def _evaluate_checkpoints(d: Draft, jobs: list[evaluation.JobView]) -> None:
    """Evaluation Jobs for due checkpoints, whatever the phase: a failed one never touches training."""
    result = evaluation.plan(d.run, d.status, jobs, d.stamp)
    if result is not None:
        d.status.evaluation = result.evaluation
        d.out.eval_jobs += result.creates
        for event in result.events:
            d.event(*event)


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
    if failure == HUNG:  # its own limit and backoff, counted in hangs (restartPolicy.hang)
        hangs = new.restarts_by_reason[HUNG]
        if hangs > policy.hang.max_restarts:
            _finish(d, "Failed", "HangLimitExceeded",
                    f"{detail}; hang {hangs} exceeds restartPolicy.hang.maxRestarts {policy.hang.max_restarts}")
            return
        delay = backoff_seconds(policy.hang.backoff_seconds, hangs)
    else:
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


def _held_worker_seconds(d: Draft, since: datetime | None) -> float:
    """Worker-seconds spent holding nodes from `since` to now, from what each pod did:
    its containers' start and end as the kubelet reports them, clipped to the interval. Not
    the last known size times the interval: after an operator outage, pods that failed in its
    first minute were charged for all of it (issue 19: 16 GPU-hours for one hour of 2 failed
    8-GPU pods). A Running pod that reports no start time is charged the whole interval; a
    watched worker now gone (deleted by someone else, its node's GC) is too, since nothing says
    when it stopped and a budget must not be overrun. A pod the operator deleted is charged up
    to the last reconcile that saw it (at most one interval short)."""
    if since is None or d.now <= since:
        return 0.0
    seconds = 0.0
    for pod in d.pods:
        start = pod.started_at or (since if pod.phase == "Running" else None)
        if start is not None:
            seconds += max((min(pod.finished_at or d.now, d.now) - max(start, since)).total_seconds(), 0.0)
    present = {p.uid for p in d.pods}
    vanished = [w for w in d.status.workers if w.uid not in present and w.uid not in d.status.handled_failures]
    return seconds + len(vanished) * (d.now - since).total_seconds()


def _account_gpu_hours(d: Draft) -> None:
    """Add the GPU-hours the workers held since `accountedAt`."""
    held_s = _held_worker_seconds(d, parse_time(d.status.gpu_hours.accounted_at))
    used = d.status.gpu_hours.used + held_s * d.spec.gpus_per_node / 3600
    d.status.gpu_hours = GpuHours(used=round(used, 6), accounted_at=d.stamp)


def _account_goodput(d: Draft) -> None:
    """Split the device-hours since the last accounting by use (goodput.py), with the workers
    held, the phase and evaluation Jobs since then (this plan has not changed them yet)."""
    status, spec = d.status, d.spec
    since = parse_time(status.goodput.accounted_at)
    interval = (d.now - since).total_seconds() if since is not None and d.now > since else 0.0
    workers = _held_worker_seconds(d, since) / interval if interval else 0.0  # their mean number
    status.goodput = goodput.account(
        status.goodput, status.progress, devices=workers * max(spec.gpus_per_node, 1),
        evaluation_devices=_evaluation_devices(d), phase=status.phase, now=d.now)


def _evaluation_devices(d: Draft) -> float:
    """Devices of the evaluation Jobs running (a CPU Job counting as one)."""
    if d.status.evaluation is None or d.spec.eval is None:
        return 0.0
    return float(len(d.status.evaluation.running) * max(evaluation.eval_gpus(d.run), 1))


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
    status.layout = parallel_layout(spec, len(running))
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


def parallel_layout(spec: BloomRunSpec, running: int) -> Layout:
    """The tensor x pipeline x data-parallel layout of the world `running` workers form.

    Each worker is a node of max(gpusPerNode, 1) ranks (gpusPerNode 0: one CPU process per
    node); torchrun's elastic rendezvous forms the world from whatever workers run, once
    nodes.min of them do, so the data-parallel degree is world / (tensor x pipeline), exactly
    the trainer's (bloomrun.trainer.parallel.data_parallel): validation refuses a node range
    with a count that holds no whole number of replicas (spec.world_size_refusals), so the
    division is exact. Below nodes.min no world has formed: data is 0."""
    tensor, pipeline = spec.parallel.tensor, spec.parallel.pipeline
    world = running * max(spec.gpus_per_node, 1) if running >= spec.nodes.min else 0
    data = world // (tensor * pipeline)
    return Layout(tensor=tensor, pipeline=pipeline, data=data, display=f"{tensor}x{pipeline}x{data}")


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
    strip = lambda s: {k: v for k, v in s.items() if k not in ("gpu_hours", "goodput", "progress")}  # noqa: E731
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
