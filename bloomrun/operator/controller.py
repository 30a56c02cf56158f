"""One reconcile of one run: read it fresh, plan (pure), then carry out the plan.

Order matters for exactly-once counting and no duplicates: (1) apply the infrastructure,
(2) write the status conditionally on the resourceVersion that was planned from, (3) only
then delete failed or surplus pods and create missing ones, (4) post Events. A Conflict in
(2) abandons the rest; the next trigger plans again from a fresh read.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from bloomrun.operator import reconcile as planner
from bloomrun.operator.desired import Run
from bloomrun.operator.kube import ApiError, Conflict, Kube, NamespaceTerminating
from bloomrun.operator.metrics import OperatorMetrics
from bloomrun.operator.reconcile import PodView
from bloomrun.operator.spec import BloomRunStatus, ManifestError

log = logging.getLogger(__name__)

CONFLICT_RETRY_S = 1.0
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


class Controller:
    def __init__(self, kube: Kube, metrics: OperatorMetrics):
        self.kube = kube
        self.metrics = metrics
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._timers: dict[tuple[str, str], threading.Timer] = {}
        self.pods_source = None  # callable (namespace, name) -> list[PodView]
        self.infra_source = None  # callable (namespace, name) -> set[(kind, name)] of existing children
        self.nodes_source = NodeNames(kube)  # callable () -> set[str] | None
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
            run = Run.from_body(body)
        except ManifestError as err:
            self._refuse(body, status, str(err), now)
            return
        pods = self.pods_source(namespace, name) if self.pods_source else [
            PodView.from_body(p) for p in self.kube.list_pods(namespace, f"bloomrun.io/run={name}")]
        nodes = self._known_nodes(pods)
        infra = self.infra_source(namespace, name) if self.infra_source else None
        plan = planner.plan(run, status, pods, now, known_nodes=nodes, observed_infra=infra)

        if plan.infra:
            for obj in plan.infra.objects:
                self.kube.apply(obj)
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

    def _known_nodes(self, pods: list[PodView]) -> set[str] | None:
        """Node names from the watch-fed index, confirmed by a GET for any pod's node the index
        lacks: a pod can be bound to a node whose watch event has not arrived yet, and
        calling that node lost would kill a healthy worker."""
        if self.nodes_source is None:
            return None
        nodes = self.nodes_source()
        if nodes is None:
            return None
        for pod in pods:
            if pod.node_name and pod.node_name not in nodes and self.kube.node_exists(pod.node_name):
                nodes = nodes | {pod.node_name}
        return nodes

    def _refuse(self, body: dict, status: BloomRunStatus, message: str, now: datetime) -> None:
        """A stored spec the pydantic checks reject: Failed with the reason, no children."""
        meta = body["metadata"]
        if status.phase == "Failed" and status.message == message:
            return
        refused = planner.refuse_invalid_spec(status, message, meta.get("generation", 1), now)
        try:
            self.kube.patch_run_status(meta["namespace"], meta["name"], meta["resourceVersion"], status_patch(refused))
        except Conflict:
            self.requeue(meta["namespace"], meta["name"], CONFLICT_RETRY_S)
            return
        self.kube.post_event(body, "Warning", "InvalidSpec", message)
        log.warning("%s/%s: invalid spec: %s", meta["namespace"], meta["name"], message)

    def requeue(self, namespace: str, name: str, delay: float, keep_earlier: bool = False) -> None:
        """Reconcile again after `delay` (backoff ends, conflicts, event bursts); the timer
        is the safety net. With keep_earlier, a reconcile already due sooner is left as is."""
        key = (namespace, name)
        due = time.monotonic() + max(delay, 0.05)
        with self._locks_guard:
            previous = self._timers.get(key)
            if previous and previous.is_alive():
                if keep_earlier and previous.due <= due:  # type: ignore[attr-defined]
                    return
                previous.cancel()
            # The timer thread only hands over: reconciles run on a bounded pool, so 200 runs
            # due at once do not open 200 connections.
            timer = threading.Timer(max(delay, 0.05), self.executor.submit, args=(self._safe_reconcile, *key))
            timer.due = due  # type: ignore[attr-defined]
            timer.daemon = True
            self._timers[key] = timer
            timer.start()

    def _safe_reconcile(self, namespace: str, name: str) -> None:
        try:
            self.reconcile(namespace, name)
        except (ApiError, OSError) as err:
            log.warning("reconcile of %s/%s failed: %s (the timer retries)", namespace, name, err)
        except Exception:  # a bug must not kill the timer thread silently
            log.exception("reconcile of %s/%s crashed", namespace, name)
