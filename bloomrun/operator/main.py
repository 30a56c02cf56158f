"""Thin kopf handlers: every trigger runs the same reconcile of one run.

create, update (spec), resume, a timer, and events of the run's pods all call
`Controller.reconcile`, which reads the run fresh, plans (reconcile.py, pure) and applies
the plan (kube.py). Pods are observed through a kopf index fed by a watch, so a reconcile
lists no pods. State lives in the API server only (status, annotations), so any
replica can take over: replicas coordinate through kopf peering.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import kopf

from bloomrun.operator.controller import Controller
from bloomrun.operator.desired import MANAGED_BY, OPERATOR, RUN_LABEL
from bloomrun.operator.kube import ApiError, Kube
from bloomrun.operator.metrics import DEFAULT_PORT, OperatorMetrics
from bloomrun.operator.reconcile import PodView
from bloomrun.operator.spec import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)


@dataclass
class Options:
    metrics_port: int = DEFAULT_PORT
    # Safety net: events drive reconciles, the timer catches the rest. Read at import
    # because kopf fixes a timer's interval when it is registered.
    timer_interval_s: float = float(os.environ.get("BLOOMRUN_OPERATOR_TIMER_S", "10"))
    max_workers: int = 16
    namespaces: tuple[str, ...] = ()  # empty: cluster-wide


def needs_scanning(namespaces: tuple[str, ...]) -> bool:
    """Whether kopf must observe Namespaces and CRDs: cluster-wide, or serving namespace
    patterns (`br-*`, `!kube-system`) it can only resolve by listing namespaces. Exact names
    need neither, so a namespaced install needs no cluster-wide list/watch on them."""
    return not namespaces or any(set(ns) & set("*?[!") for ns in namespaces)


OPTIONS = Options()
WORKERS = {MANAGED_BY: OPERATOR, RUN_LABEL: kopf.PRESENT}  # every child carries these
# Pod events come in bursts (a 64-node run's pods are created, bound and started within a
# second): each schedules one reconcile of the run shortly after, so a burst costs one.
POD_EVENT_DEBOUNCE_S = 0.2


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    # Keep kopf's bookkeeping in our own annotations, and out of the structural status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.enabled = False  # Events are ours (kube.post_event), not "handler succeeded"
    settings.execution.max_workers = OPTIONS.max_workers
    settings.watching.server_timeout = 300
    settings.watching.connect_timeout = 10
    # Cluster-wide, kopf lists/watches CRDs to notice ours being installed later; the chart
    # installs the CRD first, so exact namespaces skip both watches (and their RBAC).
    settings.scanning.disabled = not needs_scanning(OPTIONS.namespaces)
    metrics = OperatorMetrics()
    if OPTIONS.metrics_port:
        metrics.serve(OPTIONS.metrics_port)
    memo.controller = Controller(Kube(on_error=lambda verb: metrics.api_errors.labels(verb=verb).inc()), metrics)


@kopf.index("pods", labels=WORKERS)
def worker_pods(namespace, labels, body, **_):
    return {(namespace, labels[RUN_LABEL]): PodView.from_body(body)}


# The run's other children, watched like the pods so that one deleted by hand is recreated
# on the next reconcile without a single extra API call per reconcile.
INFRA_RESOURCES = {
    "ServiceAccount": ("v1", "serviceaccounts"),
    "ConfigMap": ("v1", "configmaps"),
    "Service": ("v1", "services"),
    "Role": ("rbac.authorization.k8s.io", "v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io", "v1", "rolebindings"),
}


def _infra_index_id(kind: str) -> str:
    return f"infra_{kind.lower()}"


def _infra_indexer(kind: str):
    def index(namespace, name, labels, **_):
        return {(namespace, labels[RUN_LABEL]): (kind, name)}
    return index


def _infra_deleted(type, namespace, labels, memo, **_) -> None:  # noqa: A002 (kopf's name)
    controller: Controller = memo.controller
    if type == "DELETED" and controller.pods_source is not None:
        controller.requeue(namespace, labels[RUN_LABEL], POD_EVENT_DEBOUNCE_S, keep_earlier=True)


for _kind, _resource in INFRA_RESOURCES.items():
    kopf.index(*_resource, labels=WORKERS, id=_infra_index_id(_kind))(_infra_indexer(_kind))
    kopf.on.event(*_resource, labels=WORKERS, id=f"{_infra_index_id(_kind)}_event")(_infra_deleted)


def _reconcile(memo: kopf.Memo, namespace: str, name: str, worker_pods: kopf.Index, indexes: dict) -> None:
    controller: Controller = memo.controller
    if controller.pods_source is None:  # the indexes are live views: hand them over once
        infra = [indexes[_infra_index_id(kind)] for kind in INFRA_RESOURCES]
        controller.infra_source = lambda ns, run: {c for index in infra for c in _snapshot(index, (ns, run))}
        controller.pods_source = lambda ns, run: _snapshot(worker_pods, (ns, run))
    try:
        controller.reconcile(namespace, name)
    except ApiError as err:
        log.warning("reconcile of %s/%s failed: %s (the timer retries)", namespace, name, err)
    except Exception:  # never let kopf back off for a minute: the timer retries in seconds
        log.exception("reconcile of %s/%s crashed (the timer retries)", namespace, name)


def _snapshot(index: kopf.Index, key) -> list:
    for _ in range(3):  # the index is updated on the event loop while we read from a thread
        try:
            return list(index.get(key, []))
        except RuntimeError:
            continue
    return list(index.get(key, []))


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def run_changed(namespace, name, memo, worker_pods, **indexes) -> None:
    _reconcile(memo, namespace, name, worker_pods, indexes)


@kopf.timer(GROUP, VERSION, PLURAL, interval=OPTIONS.timer_interval_s, initial_delay=OPTIONS.timer_interval_s)
def run_timer(namespace, name, memo, worker_pods, **indexes) -> None:
    _reconcile(memo, namespace, name, worker_pods, indexes)




@kopf.on.event("pods", labels=WORKERS)
def worker_changed(namespace, labels, memo, worker_pods, **indexes) -> None:
    controller: Controller = memo.controller
    if controller.pods_source is None:
        _reconcile(memo, namespace, labels[RUN_LABEL], worker_pods, indexes)
    else:
        controller.requeue(namespace, labels[RUN_LABEL], POD_EVENT_DEBOUNCE_S, keep_earlier=True)
