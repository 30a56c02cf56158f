"""A glob-serving operator serves a namespace created right after it reports live, and one
being deleted until it is gone.

kopf lists the namespaces once, then starts its namespace watch with a second listing of its
own and ignores that listing's items; a namespace created between the two was never served
(bloomrun/operator/main.py, `patch_namespace_observer`). The window is open right when the
liveness endpoint first answers, so each round starts a fresh operator, creates a matching
namespace at once and waits for the operator to reconcile a BloomRun in it; another creates
namespaces all through an operator's start and checks kopf watches runs in every one. The
last deletes a namespace holding a run and waits for it to go.
"""

from __future__ import annotations

import re
import threading
import time
import uuid

import pytest
from kubernetes import client

from .e2e import Operator, Runs, install_crds, wait_for

pytestmark = [pytest.mark.cluster]

ROUNDS = 4
# A served namespace's run gets its first status in about a second; an unserved one never
# (no list/watch of it in 60 s), so 30 s only allows for a loaded CI machine.
RECONCILE_S = 30


@pytest.fixture(scope="module")
def crd(cluster):
    install_crds(cluster)


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_namespace_created_right_after_liveness_is_served(cluster, crd, round_):
    operator = Operator(cluster, "--standalone", "--namespace", "br-nsrace-*")
    namespace = cluster.new_namespace("br-nsrace", pod_security="restricted")
    runs = Runs(cluster, namespace)
    try:
        runs.create(runs.manifest("first", ["no-such-node"], 1, 1))
        try:
            runs.wait_status("first", bool, RECONCILE_S, "a first reconcile")
        except TimeoutError as err:
            raise AssertionError(f"{err}\noperator log (tail):\n{operator.child.log_tail(40)}") from None
    finally:
        operator.stop()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")


# Namespaces created every CREATE_EVERY_S from the operator's spawn until BURST_AFTER_LIVE_S
# after its liveness answers: some land between kopf's two namespace listings.
CREATE_EVERY_S = 0.05
BURST_AFTER_LIVE_S = 3.0


def test_namespaces_created_all_through_the_start_are_served(cluster, crd):
    core = client.CoreV1Api(cluster.api())
    created: list[str] = []
    live = threading.Event()

    def burst() -> None:
        until = None
        while until is None or time.monotonic() < until:
            name = f"br-nsburst-{uuid.uuid4().hex[:6]}"
            core.create_namespace({"metadata": {"name": name}})
            created.append(name)
            if until is None and live.is_set():
                until = time.monotonic() + BURST_AFTER_LIVE_S
            time.sleep(CREATE_EVERY_S)

    creator = threading.Thread(target=burst, daemon=True)
    operator = None
    try:
        creator.start()
        operator = Operator(cluster, "--standalone", "--verbose", "--namespace", "br-nsburst-*")
        live.set()
        creator.join(60)

        def unwatched() -> set[str]:  # kopf logs each watch-stream it starts (--verbose)
            watched = set(re.findall(r"Starting the watch-stream for bloomruns\S* in '([^']+)'", operator.log()))
            return set(created) - watched

        try:
            wait_for(lambda: not unwatched(), RECONCILE_S, "a watch of runs in every namespace")
        except TimeoutError as err:
            raise AssertionError(f"{err}: {len(unwatched())} of {len(created)} never watched: "
                                 f"{sorted(unwatched())}") from None
    finally:
        live.set()
        creator.join(60)
        if operator is not None:
            operator.stop()
        for name in created:
            core.delete_namespace(name)
        # Gone before the next module: an operator serving `br-*` that starts among a few
        # hundred namespaces being deleted is another test.
        wait_for(lambda: not any(ns.metadata.name in created for ns in core.list_namespace().items),
                 120, f"the {len(created)} namespaces deleted")


def test_a_deleted_namespace_holding_a_run_goes_away(cluster, crd):
    """The run holds kopf's finalizer (its daemon's): the operator must serve the namespace
    until the run is deleted, not stop at the first sign of the namespace's deletion, or
    the namespace stays Terminating for ever (main.patch_namespace_observer)."""
    core = client.CoreV1Api(cluster.api())
    operator = Operator(cluster, "--standalone", "--namespace", "br-nsdel-*")
    namespace = cluster.new_namespace("br-nsdel", pod_security="restricted")
    runs = Runs(cluster, namespace, operator)
    try:
        runs.create(runs.manifest("doomed", ["no-such-node"], 1, 1))
        runs.wait_status("doomed", bool, RECONCILE_S, "a first reconcile")
        assert runs.get("doomed")["metadata"]["finalizers"], "kopf's finalizer, which the deletion must wait for"
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")

        def gone() -> bool:
            try:
                core.read_namespace(namespace)
            except client.ApiException as err:
                return err.status == 404
            return False
        try:
            wait_for(gone, 60, f"namespace {namespace} deleted")
        except TimeoutError as err:
            raise AssertionError(f"{err}: {core.read_namespace(namespace).status}{runs.operator_state()}") from None
    finally:
        operator.stop()
