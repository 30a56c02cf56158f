"""One reconcile of one run: read it fresh, plan (pure), then carry out the plan.

Order matters for exactly-once counting and no duplicates: (1) apply the infrastructure,
(2) write the status conditionally on the resourceVersion that was planned from, (3) only
then delete failed or surplus pods and create missing ones, (4) post Events. A Conflict in
(2) abandons the rest; the next trigger plans again from a fresh read.

Scheduling: each run has one loop (`serve`), run by kopf as the run's daemon. It reconciles
when `requeue` asks (a backoff ends, a conflict, a burst of pod events) and at the latest
`interval_s` after its last reconcile. kopf stops the daemon when the run is deleted, the
operator exits, or peering pauses this replica, so a paused replica has no loop and its
requeues are dropped: only the active replica acts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from typing import Callable

from bloomrun.operator import admission, evaluation
from bloomrun.operator import reconcile as planner
from bloomrun.operator.admission import RunPolicy
from bloomrun.operator.desired import Run
from bloomrun.operator.kube import ApiError, Conflict, ForeignObject, Kube, LeftoverChild, NamespaceTerminating
from bloomrun.operator.metrics import OperatorMetrics
from bloomrun.operator.reconcile import FOREIGN_CHILD, INVALID_SPEC, PodView
from bloomrun.operator.spec import DEFAULT_IMAGE, BloomRunStatus, ManifestError

log = logging.getLogger(__name__)

CONFLICT_RETRY_S = 1.0
LEFTOVER_RETRY_S = 2.0  # a deleted predecessor's children: GC removes them within seconds
NODE_LIST_EVERY_S = 10.0
MAX_PARALLEL_REQUESTS = 8  # pod creates of one reconcile, and requeued reconciles


class NodeNames:
    """Names of existing nodes, re-listed at most every NODE_LIST_EVERY_S.

    A metadata-only list from the watch cache instead of a kopf index: indexing 2,000 nodes
    through kopf's per-object machinery held the operator's first reconcile back ~30 s in
    the scale benchmark. Staleness is harmless: a pod on a node missing from the list is
    confirmed with a GET before it is called lost."""

    def __init__(self, kube: Kube):
        self.kube = kube
        self._names: set[str] | None = None
        self._listed_at = -float("inf")
        self._lock = threading.Lock()

    def __call__(self) -> set[str] | None:
        with self._lock:
            if time.monotonic() - self._listed_at >= NODE_LIST_EVERY_S:
                try:
                    self._names = self.kube.list_node_names() or None
                except (ApiError, OSError) as err:
                    log.warning("could not list nodes: %s", err)
                self._listed_at = time.monotonic()
            return self._names


def status_patch(status: BloomRunStatus) -> dict:
    # progress belongs to the trainer: leaving it out of the merge-patch leaves it alone.
    return status.model_dump(by_alias=True, mode="json", exclude={"progress"})


PodsSource = Callable[[str, str], list[PodView]]  # (namespace, run) -> the run's worker pods
InfraSource = Callable[[str, str], set[tuple[str, str]]]  # (namespace, run) -> (kind, name) that exist
NodesSource = Callable[[], "set[str] | None"]  # names of the existing nodes (None: unknown)
JobsSource = Callable[[str, str], list[evaluation.JobView]]  # (namespace, run) -> its evaluation Jobs


class Schedule:
    """When each run's loop should reconcile next; safe to call from any thread.

    A request only counts for a run whose loop is attached (see the module docstring), and
    the earliest request wins: a later one never postpones a reconcile already due."""

    def __init__(self):
        self._requested: dict[tuple[str, str], float] = {}  # monotonic time asked for
        self._last: dict[tuple[str, str], float] = {}  # monotonic time of the loop's last reconcile
        self._wakers: dict[tuple[str, str], Callable[[], None]] = {}
        self._lock = threading.Lock()

    def attach(self, key: tuple[str, str], waker: Callable[[], None]) -> None:
        with self._lock:
            self._wakers[key] = waker
            self._last[key] = time.monotonic()

    def detach(self, key: tuple[str, str]) -> None:
        with self._lock:
            for table in (self._wakers, self._last, self._requested):
                table.pop(key, None)

    def request(self, key: tuple[str, str], delay: float) -> None:
        due = time.monotonic() + max(delay, 0.0)
        with self._lock:
            waker = self._wakers.get(key)
            if waker is None or self._requested.get(key, due) < due:
                return
            self._requested[key] = due
        waker()

    def seconds_left(self, key: tuple[str, str], interval_s: float) -> float:
        with self._lock:
            due = min(self._requested.get(key, float("inf")), self._last.get(key, 0.0) + interval_s)
        return due - time.monotonic()

    def started(self, key: tuple[str, str]) -> None:
        """The loop starts a reconcile: requests made before it are served by it."""
        with self._lock:
            self._requested.pop(key, None)
            self._last[key] = time.monotonic()


class Controller:
    def __init__(self, kube: Kube, metrics: OperatorMetrics, pods: PodsSource, infra: InfraSource | None = None,
                 nodes: NodesSource | None = None, interval_s: float = 10.0, default_image: str = DEFAULT_IMAGE,
                 eval_jobs: JobsSource | None = None, run_policy: RunPolicy | None = None):
        """`infra` None: which children exist is unknown (they are applied when the spec
        changes only); `nodes` None: a NodeNames list of the cluster's nodes."""
        self.kube = kube
        self.metrics = metrics
        self.pods = pods
        self.infra = infra
        self.eval_jobs = eval_jobs or (lambda namespace, name: [])
        self.nodes = nodes or NodeNames(kube)
        self.interval_s = interval_s  # the safety net: events drive reconciles, this catches the rest
        self.default_image = default_image  # for runs whose spec names no trainer image
        self.run_policy = run_policy or RunPolicy()  # what this install lets runs ask for
        self.schedule = Schedule()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # The loops only hand over: reconciles run on a bounded pool, so 200 runs due at once
        # do not open 200 connections.
        self.executor = ThreadPoolExecutor(MAX_PARALLEL_REQUESTS, thread_name_prefix="reconcile")
        self.requests = ThreadPoolExecutor(MAX_PARALLEL_REQUESTS, thread_name_prefix="api")

    def _lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def reconcile(self, namespace: str, name: str) -> None:
        """Serialised per run: kopf runs handlers of different objects (pods) concurrently."""
        with self._lock((namespace, name)):
            started = time.perf_counter()
            try:
                self._reconcile(namespace, name)
            except NamespaceTerminating:
                log.debug("%s/%s: its namespace is being deleted; leaving it to the garbage collector",
                          namespace, name)
            finally:
                self.metrics.reconcile_seconds.observe(time.perf_counter() - started)

    def _reconcile(self, namespace: str, name: str) -> None:
        body = self.kube.get_run(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.metrics.forget_run(namespace, name)
            return  # the garbage collector removes the children through owner references
        status = BloomRunStatus.model_validate(body.get("status") or {})
        now = datetime.now(timezone.utc)
        try:
            run = Run.from_body(body, self.default_image)
        except ManifestError as err:
            self._refuse(body, status, str(err), now)
            return
        # The install's rules (the chart's admission policy refuses such runs first, where installed).
        refused = admission.refusal(run.spec, self.run_policy)
        if refused is not None:
            self._refuse(body, status, refused, now, reason=admission.POLICY_VIOLATION)
            return
        pods = self.pods(namespace, name)
        nodes = self._known_nodes(pods)
        infra = self.infra(namespace, name) if self.infra else None
        jobs = self._eval_jobs(namespace, name, status)
        plan = planner.plan(run, status, pods, now, known_nodes=nodes, observed_infra=infra, eval_jobs=jobs,
                            unready_since=self._unready_nodes(pods, now))

        if plan.infra:
            try:
                for obj in plan.infra.objects:
                    self.kube.apply_owned(obj, run.uid)
            except LeftoverChild as err:
                log.info("%s/%s: %s", namespace, name, err)
                self.requeue(namespace, name, LEFTOVER_RETRY_S)
                return
            except ForeignObject as err:
                self._refuse(body, status, str(err), now, reason=FOREIGN_CHILD)
                return
        if plan.status_changed:
            try:
                self.kube.patch_run_status(namespace, name, body["metadata"]["resourceVersion"],
                                           status_patch(plan.status))
            except Conflict:
                self.requeue(namespace, name, CONFLICT_RETRY_S)
                return
        for delete in plan.deletes:
            self.kube.delete_pod(namespace, delete.name, delete.uid, force=delete.force)
        # A 64-node run's pods: created in parallel, each create idempotent by name.
        list(self.requests.map(lambda create: self.kube.create_pod(create.manifest), plan.creates))
        for job in plan.eval_jobs:
            self._create_eval_job(job, run.uid)
        for event in plan.events:
            self.kube.post_event(body, event.type, event.reason, event.message)

        for reason in plan.restart_reasons:
            self.metrics.restarts.labels(namespace=namespace, run=name, reason=reason).inc()
        if plan.became_running:
            created = planner.parse_time(body["metadata"].get("creationTimestamp"))
            if created:
                self.metrics.time_to_running.observe((now - created).total_seconds())
        self.metrics.observe_run(namespace, name, plan.status, run.spec.budget.gpu_hours)
        if plan.requeue_after is not None:
            self.requeue(namespace, name, plan.requeue_after)

    def _eval_jobs(self, namespace: str, name: str, status: BloomRunStatus) -> list[evaluation.JobView]:
        """The run's evaluation Jobs; a finished one whose outcome is not recorded yet comes
        with its pod's termination message (the summary, or what failed)."""
        jobs = self.eval_jobs(namespace, name)
        waiting = {job.uid for job in evaluation.awaiting_summary(status, jobs)}
        return [replace(job, summary=self.kube.job_termination_message(namespace, job.uid))
                if job.uid in waiting else job for job in jobs]

    def _create_eval_job(self, manifest: dict, run_uid: str) -> None:
        """Create-first; a Job of that name left by an earlier run of the same name (until the
        garbage collector removes it) is logged and tried again next time, never adopted."""
        try:
            self.kube.create_owned(manifest, run_uid)
        except ForeignObject as err:
            log.warning("evaluation Job not created: %s", err)

    def _known_nodes(self, pods: list[PodView]) -> set[str] | None:
        """Node names from the watch-fed index, confirmed by a GET for any pod's node the index
        lacks: a pod can be bound to a node whose watch event has not arrived yet, and
        calling that node lost would kill a healthy worker."""
        nodes = self.nodes()
        if nodes is None:
            return None
        for pod in pods:
            if pod.node_name and pod.node_name not in nodes and self.kube.node_exists(pod.node_name):
                nodes = nodes | {pod.node_name}
        return nodes

    def _unready_nodes(self, pods: list[PodView], now: datetime) -> dict[str, datetime]:
        """The nodes of workers still Terminating after their grace period that are not Ready,
        and since when (planner.stuck_terminating): a GET per such node, so only deletions
        that are overdue cost a request."""
        overdue = {p.node_name for p in pods if p.deleting and p.node_name
                   and p.deletion_deadline is not None and p.deletion_deadline <= now}
        unready = {}
        for node_name in sorted(overdue):
            node = self.kube.get_node(node_name)
            since = planner.node_unready_since(node, now) if node is not None else None
            if since is not None:
                unready[node_name] = since
        return unready

    def _refuse(self, body: dict, status: BloomRunStatus, message: str, now: datetime,
                reason: str = INVALID_SPEC) -> None:
        """A stored spec the pydantic checks reject, or a child whose name is taken by an
        object of someone else's: Failed with the reason, and nothing more created."""
        meta = body["metadata"]
        if status.phase == "Failed" and status.message == message:
            return
        refused = planner.refuse(status, message, reason, meta.get("generation", 1), now)
        try:
            self.kube.patch_run_status(meta["namespace"], meta["name"], meta["resourceVersion"], status_patch(refused))
        except Conflict:
            self.requeue(meta["namespace"], meta["name"], CONFLICT_RETRY_S)
            return
        self.kube.post_event(body, "Warning", reason, message)
        log.warning("%s/%s: %s: %s", meta["namespace"], meta["name"], reason, message)

    def requeue(self, namespace: str, name: str, delay: float) -> None:
        """Reconcile again after `delay` (backoff ends, conflicts, event bursts), or sooner if
        already due sooner; dropped where the run has no loop (module docstring)."""
        self.schedule.request((namespace, name), delay)

    def reconcile_or_log(self, namespace: str, name: str) -> None:
        """`reconcile`, logging instead of raising: the loop retries within `interval_s`, where
        an exception in a kopf handler would make kopf back off for a minute."""
        try:
            self.reconcile(namespace, name)
        except (ApiError, OSError) as err:
            log.warning("reconcile of %s/%s failed: %s (retried within %gs)", namespace, name, err, self.interval_s)
        except Exception:  # a bug must not end the loop silently
            log.exception("reconcile of %s/%s crashed (retried within %gs)", namespace, name, self.interval_s)

    async def serve(self, namespace: str, name: str) -> None:
        """The run's loop: reconcile whenever the schedule says, until cancelled (kopf cancels
        the run's daemon; a reconcile already running finishes on its thread)."""
        key, loop, wake = (namespace, name), asyncio.get_running_loop(), asyncio.Event()

        def wake_up() -> None:  # from any thread
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the event loop closed: the operator is exiting
                pass

        self.schedule.attach(key, wake_up)
        try:
            while True:
                wake.clear()
                left = self.schedule.seconds_left(key, self.interval_s)
                if left > 0:
                    try:
                        await asyncio.wait_for(wake.wait(), left)
                    except asyncio.TimeoutError:
                        pass
                    continue  # woken by an earlier request, or due now: look again
                self.schedule.started(key)
                await loop.run_in_executor(self.executor, self.reconcile_or_log, namespace, name)
        finally:
            self.schedule.detach(key)
