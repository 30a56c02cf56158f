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

import asyncio
import logging
from dataclasses import dataclass

import kopf
from kopf._cogs.structs import references
from kopf._core.reactor import observation

from bloomrun.operator import evaluation
from bloomrun.operator import study as studies
from bloomrun.operator.admission import RunPolicy
from bloomrun.operator.controller import Controller
from bloomrun.operator.desired import INFRA_KINDS, MANAGED_BY, OPERATOR, RUN_LABEL, WORKER_KIND, ChildKind
from bloomrun.operator.kube import Kube
from bloomrun.operator.metrics import DEFAULT_PORT, OperatorMetrics
from bloomrun.operator.reconcile import PodView
from bloomrun.operator.spec import DEFAULT_IMAGE, GROUP, PLURAL, VERSION
from bloomrun.study.spec import PLURAL as STUDY_PLURAL
from bloomrun.study.spec import STUDY_LABEL

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    metrics_port: int = DEFAULT_PORT  # 0: no metrics endpoint
    timer_interval_s: float = 10.0  # the safety net: events drive reconciles, this catches the rest
    max_workers: int = 16  # kopf's threads for sync handlers
    namespaces: tuple[str, ...] = ()  # empty: cluster-wide
    trainer_image: str = DEFAULT_IMAGE  # for runs whose spec names none
    run_policy: RunPolicy = RunPolicy()  # what runs may ask of the cluster (the chart's runPolicy)


def needs_scanning(namespaces: tuple[str, ...]) -> bool:
    """Whether kopf must observe Namespaces and CRDs: cluster-wide, or serving namespace
    patterns (`br-*`, `!kube-system`) it can only resolve by listing namespaces. Exact names
    need neither, so a namespaced install needs no cluster-wide list/watch on them."""
    return not namespaces or any(set(ns) & set("*?[!") for ns in namespaces)


WORKERS = {MANAGED_BY: OPERATOR, RUN_LABEL: kopf.PRESENT}  # every child carries these
EVAL_JOBS = {MANAGED_BY: OPERATOR, evaluation.EVAL_LABEL: kopf.PRESENT, evaluation.STEP_LABEL: kopf.PRESENT}
# Pod events come in bursts (a 64-node run's pods are created, bound and started within a
# second): each requeues the run shortly after, so a burst costs one reconcile.
POD_EVENT_DEBOUNCE_S = 0.2
# A cancelled loop leaves at its next await; a reconcile it started finishes on its thread.
LOOP_CANCELLATION_TIMEOUT_S = 5.0


def register(options: Options, registry: kopf.OperatorRegistry | None = None) -> kopf.OperatorRegistry:
    """Every handler of the operator, on `registry` (a new one by default), configured by
    `options`: nothing is read from the environment, nothing registered at import."""
    registry = registry if registry is not None else kopf.OperatorRegistry()
    patch_namespace_observer()
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
    # Evaluation Jobs: watched so that a finished one is recorded at once.
    job = evaluation.JOB_KIND
    kopf.index(job.api_version, job.plural, labels=EVAL_JOBS, id="eval_jobs", registry=registry)(eval_job)
    kopf.on.event(job.api_version, job.plural, labels=EVAL_JOBS, id="eval_job_event",
                  registry=registry)(eval_job_changed)
    for on in (kopf.on.resume, kopf.on.create):
        on(GROUP, VERSION, PLURAL, registry=registry)(run_changed)
    kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)(run_changed)
    kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=LOOP_CANCELLATION_TIMEOUT_S,
                registry=registry)(run_loop)
    # Studies (bloomrun/operator/study.py): reconciled when created or changed, when one of
    # their arm runs changes, and by a loop every timer_interval_s as the safety net.
    kopf.on.update(GROUP, VERSION, STUDY_PLURAL, field="spec", registry=registry)(study_changed)
    kopf.daemon(GROUP, VERSION, STUDY_PLURAL, cancellation_timeout=LOOP_CANCELLATION_TIMEOUT_S,
                param=options.timer_interval_s, registry=registry)(study_loop)
    kopf.on.event(GROUP, VERSION, PLURAL, labels={STUDY_LABEL: kopf.PRESENT}, id="study_arm_event",
                  registry=registry)(study_arm_changed)
    return registry


def patch_namespace_observer() -> None:
    """Works around two faults of kopf's (1.45.2) namespace observer, which serves namespaces
    matching a pattern (`bs-*`) and runs only for patterns. Idempotent.

    A namespace created while the operator starts was never served. kopf lists the
    namespaces, then starts its namespace watch, which lists them once more and watches from
    that second list's resourceVersion; the observer ignores the second list's items (type
    None, as it ignores a CRD watch's initial listing). A namespace created between the two
    lists is in neither the first list nor the watch: no watch of its runs until it changes
    or the operator restarts. The window opens while the liveness endpoint starts answering,
    and again at every re-list of the watch (410 Gone, a broken stream). Fix: a listed
    namespace is served like an ADDED one (adding one kopf already serves is a no-op).

    A deleted namespace holding runs stayed Terminating for ever. kopf stops serving a
    namespace at the first event of its deletion that carries conditions none of which is
    True: the namespace controller's first pass, before it deletes the runs in it. The runs
    then keep kopf's finalizer (their daemon's), which only a served namespace's watch
    removes, and the namespace waits on them ("SomeFinalizersRemain: kopf.zalando.org/
    KopfFinalizerMarker", the test cluster, 2026-12-01). Fix: a matching namespace is served
    until it is gone (DELETED). A namespace deleted while the watch is down gives no DELETED
    event: its empty watches stay until the operator restarts."""
    if getattr(observation.revise_namespaces, "serves_until_gone", False):
        return

    def revise_namespaces(*, insights, namespaces, raw_events=(), raw_bodies=()) -> None:
        for event in [*raw_events, *({"type": None, "object": body} for body in raw_bodies)]:
            name = event["object"]["metadata"]["name"]
            if event["type"] == "DELETED":
                insights.namespaces.discard(name)
            elif any(references.match_namespace(name, pattern) for pattern in namespaces):
                insights.namespaces.add(name)

    async def process_discovered_namespace_event(*, raw_event, namespaces, insights, **_) -> None:
        async with insights.revised:
            observation.revise_namespaces(raw_events=[raw_event], insights=insights, namespaces=namespaces)
            insights.revised.notify_all()

    revise_namespaces.serves_until_gone = True
    process_discovered_namespace_event.__wrapped__ = observation.process_discovered_namespace_event
    revise_namespaces.__wrapped__ = observation.revise_namespaces
    # Both looked up in kopf's module at each call: the observer's first listing calls
    # revise_namespaces, its watch (started after) process_discovered_namespace_event.
    observation.revise_namespaces = revise_namespaces
    observation.process_discovered_namespace_event = process_discovered_namespace_event


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
    jobs = kwargs["eval_jobs"]
    memo.controller = Controller(
        kube, metrics, interval_s=options.timer_interval_s, default_image=options.trainer_image,
        run_policy=options.run_policy,
        pods=lambda ns, run: _snapshot(pods, (ns, run)),
        infra=lambda ns, run: {c for index in infra for c in _snapshot(index, (ns, run))},
        eval_jobs=lambda ns, run: _snapshot(jobs, (ns, run)))
    memo.studies = studies.StudyController(kube, metrics)


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


def eval_job(namespace, labels, body, **_):
    return {(namespace, labels[evaluation.EVAL_LABEL]): evaluation.JobView.from_body(body)}


async def eval_job_changed(namespace, labels, memo, **_) -> None:
    memo.controller.requeue(namespace, labels[evaluation.EVAL_LABEL], POD_EVENT_DEBOUNCE_S)


async def worker_changed(namespace, labels, memo, **_) -> None:
    memo.controller.requeue(namespace, labels[RUN_LABEL], POD_EVENT_DEBOUNCE_S)


async def infra_deleted(type, namespace, labels, memo, **_) -> None:  # noqa: A002 (kopf's name)
    if type == "DELETED":
        memo.controller.requeue(namespace, labels[RUN_LABEL], POD_EVENT_DEBOUNCE_S)


def run_changed(namespace, name, memo, **_) -> None:
    memo.controller.reconcile_or_log(namespace, name)


async def run_loop(namespace, name, memo, **_) -> None:
    await memo.controller.serve(namespace, name)


def study_changed(namespace, name, memo, **_) -> None:
    memo.studies.reconcile_or_log(namespace, name)


def study_arm_changed(namespace, labels, memo, **_) -> None:
    memo.studies.reconcile_or_log(namespace, labels[STUDY_LABEL])


async def study_loop(namespace, name, memo, param, **_) -> None:
    """The study's loop: reconcile now (a new or resumed study) and every `param` seconds,
    until kopf cancels it (the study is deleted, the operator exits or pauses)."""
    while True:
        await asyncio.to_thread(memo.studies.reconcile_or_log, namespace, name)
        await asyncio.sleep(param)
