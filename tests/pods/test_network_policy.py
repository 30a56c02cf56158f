"""The operator's NetworkPolicy, enforced on real pods (issue 20): the c10d rendezvous store
has no authentication, so only a run's own pods may reach its ports, and Prometheus (a
namespace labelled bloomrun.io/metrics-scraper) the metrics port only.

The policies are the operator's own, rendered by desired.desired_network_policy; the pods
carry the labels desired.desired_worker gives a run's workers, and run a tiny static
listen-and-dial probe (tools/k8s/netpol/netprobe) instead of the trainer, on the run's
rendezvous and metrics ports. Enforcement is kube-network-policies (tests/cluster/
real_policy.py), which the real node set runs. Two tenants name their runs alike, as two
teams would: the policy must keep them apart by namespace, not by name alone."""

import uuid

import pytest
from kubernetes import client

from bloomrun.operator import desired
from bloomrun.operator.spec import BloomRunSpec
from tests.cluster import real_policy
from tests.cluster.real_config import nat_table
from tests.pods.netprobe import Pods, probe_pod

RUN_NAME = "ablation"
SPEC = {"model": {"preset": "tiny"}, "data": {"sources": [{"path": "examples/data/tiny"}]},
        "training": {"trainSteps": 1, "globalBatchSize": 8, "microBatchSize": 1}}


def run_in(namespace: str) -> desired.Run:
    return desired.Run(name=RUN_NAME, namespace=namespace, uid=str(uuid.uuid4()), generation=1,
                       spec=BloomRunSpec.model_validate(SPEC))


def policy_of(run: desired.Run) -> dict:
    """The operator's policy, less its owner reference: no BloomRun object exists here, and
    the garbage collector deletes what is owned by a missing object."""
    policy = desired.desired_network_policy(run)
    del policy["metadata"]["ownerReferences"]
    return policy


def worker_labels(run: desired.Run, index: int) -> dict:
    """What the operator labels worker `index` of `run` with (the policy selects by them)."""
    return desired.desired_worker(run, index)["metadata"]["labels"]


@pytest.mark.cluster
@pytest.mark.pods
def test_a_runs_policy_admits_its_own_pods_and_scrapers_on_the_metrics_port_only(
        cluster, real_nodes, netprobe):
    run_a, run_b = (run_in(cluster.new_namespace(f"tenant-{t}", pod_security="restricted"))
                    for t in "ab")
    scrapers = cluster.new_namespace("monitoring", pod_security="restricted")
    client.CoreV1Api(cluster.api()).patch_namespace(
        scrapers, {"metadata": {"labels": {desired.SCRAPER_NAMESPACE_LABEL: "true"}}})
    rdzv, metrics = desired.RDZV_PORT, run_a.spec.metrics.port
    ports = [rdzv, metrics]
    first, second = real_nodes.names
    pods = Pods(cluster)
    pods.start(run_a.namespace, probe_pod("a0", worker_labels(run_a, 0), first, real_nodes, ports))
    pods.start(run_a.namespace, probe_pod("a1", worker_labels(run_a, 1), second, real_nodes, ports))
    # run B's worker beside A's on the same node (same bridge) and the scraper on the other
    pods.start(run_b.namespace, probe_pod("b0", worker_labels(run_b, 0), first, real_nodes, ports))
    pods.start(scrapers, probe_pod("prometheus", {"app": "prometheus"}, second, real_nodes, ports))
    pods.wait_running()

    # Without a policy every pod reaches every port: what is refused below is the policy's doing.
    assert pods.dial("b0", "a0", rdzv) == f"a0 {rdzv}"
    assert pods.dial("a0", "b0", rdzv) == f"b0 {rdzv}"

    networking = client.NetworkingV1Api(cluster.api())
    for run in (run_a, run_b):
        networking.create_namespaced_network_policy(run.namespace, policy_of(run))
    cluster.wait(lambda: pods.dial("b0", "a0", rdzv) is None, 30,
                 "the enforcer to apply the policies")

    allowed = {("a1", "a0", rdzv), ("a1", "a0", metrics), ("a0", "a1", rdzv),  # own run, any port
               ("prometheus", "a0", metrics), ("prometheus", "b0", metrics)}  # scraping
    refused = {("b0", "a0", rdzv), ("b0", "a0", metrics),  # another tenant, same node
               ("a0", "b0", rdzv), ("a1", "b0", rdzv),  # ... both ways, across nodes too
               ("prometheus", "a0", rdzv), ("prometheus", "b0", rdzv)}  # scrapers: metrics only
    answered = {case: pods.dial(*case) for case in sorted(allowed | refused)}
    assert {case for case, reply in answered.items() if reply is not None} == allowed
    for source, target, port in allowed:
        assert answered[(source, target, port)] == f"{target} {port}"
    real_nodes.network.policy.check_alive()

    # The policy gone, the other tenant reaches the store again: enforcement follows the API.
    networking.delete_namespaced_network_policy(desired.network_policy_name(run_a),
                                                run_a.namespace)
    cluster.wait(lambda: pods.dial("b0", "a0", rdzv) == f"a0 {rdzv}", 30,
                 "the enforcer to drop run A's policy")


def test_the_policy_table_is_one_the_host_restore_treats_as_the_node_sets_own():
    """host_state deletes and checks nft tables named after the set's NAT table's prefix:
    a failed session's queue rules (which hold up new connections) must go with the set."""
    assert real_policy.policy_table("ab12c").startswith(nat_table("ab12c"))


def test_a_node_set_picks_a_queue_nothing_reads(monkeypatch):
    start = real_policy.QUEUES[int("ab12c", 16) % len(real_policy.QUEUES)]
    monkeypatch.setattr(real_policy, "bound_queues", lambda: {start, start + 1})
    assert real_policy.free_queue("ab12c") == start + 2
