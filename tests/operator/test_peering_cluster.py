"""kopf peering on the real control plane: a replica paused in favour of a higher-priority
one acts on nothing, not even the reconciles it had scheduled before the pause."""

from __future__ import annotations

import time

import pytest
import yaml

from bloomrun.operator.reconcile import PENDING_RECHECK_S

from .e2e import Operator, Runs, wait_for
from .test_operator_e2e import crd  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.cluster]


def num_reconciles(operator: Operator) -> float:
    for line in operator.metrics().splitlines():
        if line.startswith("bloomrun_operator_reconcile_duration_seconds_count"):
            return float(line.split()[-1])
    return 0.0


def test_a_replica_paused_by_peering_stops_reconciling(cluster, crd):  # noqa: F811
    namespace = cluster.new_namespace("pause", pod_security="restricted")
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "bloomrun", "namespace": namespace}}))
    runs = Runs(cluster, namespace)
    replicas = [Operator(cluster, "--namespace", namespace, "--peering", "bloomrun", "--priority", "10")]
    low = replicas[0]
    try:
        nodes = runs.add_nodes(1)
        # Two workers for one node: worker-1 stays Pending, so every reconcile schedules the
        # next one (PENDING_RECHECK_S) besides the timer: the chain a pause must break.
        runs.create(runs.manifest("waiting", nodes, 1, 2))
        runs.wait_phase("waiting", "Running")
        replicas.append(Operator(cluster, "--namespace", namespace, "--peering", "bloomrun", "--priority", "20"))
        wait_for(lambda: "Pausing operations" in low.child.log.read_text(), 30, "the low-priority replica to pause")
        time.sleep(1)  # a reconcile already running when the pause came may finish
        before = num_reconciles(low)
        time.sleep(PENDING_RECHECK_S + 3)
        assert num_reconciles(low) == before, "the paused replica reconciled"
    finally:
        for replica in replicas:
            replica.stop()
        runs.cleanup()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
