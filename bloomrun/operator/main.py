"""Thin kopf handlers: every trigger runs the same reconcile of one run.

create, update (spec) and resume reconcile at once; each run's loop (a kopf daemon,
`Controller.serve`) reconciles when requeued and every `timer_interval_s` at the latest;
events of the run's pods and other children requeue it. The controller reads the run fresh,
plans (reconcile.py, pure) and applies the plan (kube.py). Children are observed through
kopf indexes fed by watches, so a reconcile lists nothing. State lives in the API server
only (status, annotations), so any replica can take over: replicas coordinate through kopf
peering, which stops the loops of a paused replica along with its watches.

`register(options)` puts every handler on a kopf registry explicitly; `python -m
bloomrun.operator` parses the options, registers and runs kopf.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import kopf

from bloomrun.operator.controller import Controller
from bloomrun.operator.desired import INFRA_KINDS, MANAGED_BY, OPERATOR, RUN_LABEL, WORKER_KIND, ChildKind
from bloomrun.operator.kube import Kube
from bloomrun.operator.metrics import DEFAULT_PORT, OperatorMetrics
from bloomrun.operator.reconcile import PodView
from bloomrun.operator.spec import DEFAULT_IMAGE, GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    metrics_port: int = DEFAULT_PORT  # 0: no metrics endpoint
    timer_interval_s: float = 10.0  # the safety net: events drive reconciles, this catches the rest
    max_workers: int = 16  # kopf's threads for sync handlers
    namespaces: tuple[str, ...] = ()  # empty: cluster-wide
    trainer_image: str = DEFAULT_IMAGE  # for runs whose spec names none


def needs_scanning(namespaces: tuple[str, ...]) -> bool:
    """Whether kopf must observe Namespaces and CRDs: cluster-wide, or serving namespace
    patterns (`br-*`, `!kube-system`) it can only resolve by listing namespaces. Exact names
    need neither, so a namespaced install needs no cluster-wide list/watch on them."""
    return not namespaces or any(set(ns) & set("*?[!") for ns in namespaces)


WORKERS = {MANAGED_BY: OPERATOR, RUN_LABEL: kopf.PRESENT}  # every child carries these
# Pod events come in bursts (a 64-node run's pods are created, bound and started within a
# second): each requeues the run shortly after, so a burst costs one reconcile.
POD_EVENT_DEBOUNCE_S = 0.2
# A cancelled loop leaves at its next await; a reconcile it started finishes on its thread.
LOOP_CANCELLATION_TIMEOUT_S = 5.0


def register(options: Options, registry: kopf.OperatorRegistry | None = None) -> kopf.OperatorRegistry:
    """Every handler of the operator, on `registry` (a new one by default), configured by
    `options`: nothing is read from the environment, nothing registered at import."""
    registry = registry if registry is not None else kopf.OperatorRegistry()
    # kopf adds this fallback to its default registry only; kube.py uses the same credentials.
    kopf.on.login(registry=registry)(kopf.login_via_client)
    kopf.on.startup(param=options, registry=registry)(configure)
    kopf.index(WORKER_KIND.api_version, WORKER_KIND.plural, labels=WORKERS, id=index_id(WORKER_KIND),
               registry=registry)(worker_pods)
    kopf.on.event(WORKER_KIND.api_version, WORKER_KIND.plural, labels=WORKERS, registry=registry)(worker_changed)
    # The run's other children, watched like the pods so that one deleted by hand is
    # recreated on the next reconcile without a single extra API call per reconcile.
    for child in INFRA_KINDS:
        kopf.index(child.api_version, child.plural, labels=WORKERS, id=index_id(child), param=child.kind,
                   registry=registry)(infra_child)
        kopf.on.event(child.api_version, child.plural, labels=WORKERS, id=f"{index_id(child)}_event",
                      registry=registry)(infra_deleted)
    for on in (kopf.on.resume, kopf.on.create):
        on(GROUP, VERSION, PLURAL, registry=registry)(run_changed)
    kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)(run_changed)
    kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=LOOP_CANCELLATION_TIMEOUT_S,
                registry=registry)(run_loop)
    return registry


def index_id(child: ChildKind) -> str:
    """The kwarg under which kopf passes the index of a kind of child."""
    return "worker_pods" if child == WORKER_KIND else f"infra_{child.kind.lower()}"


def configure(param: Options, settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs) -> None:
    """Startup: kopf's settings, the metrics endpoint, and the controller wired to the indexes
    (kopf passes them to every handler by id; live views the watches fill, so handing them
    over once is enough)."""
    options = param
    # Keep kopf's bookkeeping in our own annotations, and out of the structural status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.enabled = False  # Events are ours (kube.post_event), not "handler succeeded"
    settings.execution.max_workers = options.max_workers
    settings.watching.server_timeout = 300
    settings.watching.connect_timeout = 10
    # Cluster-wide, kopf lists/watches CRDs to notice ours being installed later; the chart
    # installs the CRD first, so exact namespaces skip both watches (and their RBAC).
    settings.scanning.disabled = not needs_scanning(options.namespaces)
    metrics = OperatorMetrics()
    if options.metrics_port:
        metrics.serve(options.metrics_port)
    kube = Kube(on_error=lambda verb: metrics.api_errors.labels(verb=verb).inc())
    pods = kwargs[index_id(WORKER_KIND)]
    infra = [kwargs[index_id(child)] for child in INFRA_KINDS]
    memo.controller = Controller(
        kube, metrics, interval_s=options.timer_interval_s, default_image=options.trainer_image,
        pods=lambda ns, run: _snapshot(pods, (ns, run)),
        infra=lambda ns, run: {c for index in infra for c in _snapshot(index, (ns, run))})


def _snapshot(index: kopf.Index, key) -> list:
    for _ in range(3):  # the index is updated on the event loop while we read from a thread
        try:
            return list(index.get(key, []))
        except RuntimeError:
            continue
    return list(index.get(key, []))


def worker_pods(namespace, labels, body, **_):
    return {(namespace, labels[RUN_LABEL]): PodView.from_body(body)}


def infra_child(param: str, namespace, name, labels, **_):
    return {(namespace, labels[RUN_LABEL]): (param, name)}


async def worker_changed(namespace, labels, memo, **_) -> None:
    memo.controller.requeue(namespace, labels[RUN_LABEL], POD_EVENT_DEBOUNCE_S)


async def infra_deleted(type, namespace, labels, memo, **_) -> None:  # noqa: A002 (kopf's name)
    if type == "DELETED":
        memo.controller.requeue(namespace, labels[RUN_LABEL], POD_EVENT_DEBOUNCE_S)


def run_changed(namespace, name, memo, **_) -> None:
    memo.controller.reconcile_or_log(namespace, name)


async def run_loop(namespace, name, memo, **_) -> None:
    await memo.controller.serve(namespace, name)
