"""The chart's RBAC is sufficient and minimal: the real operator, running with exactly the
chart's ServiceAccount identity (a real token), reconciles a BloomRun end to end, and that
identity is refused what the operator has no business doing."""

from __future__ import annotations

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.chart.operator_process import apply_run, chart_release, probe_run, running_operator, wait_for_phase
from tests.cluster.identities import service_account_user

pytestmark = pytest.mark.cluster


def refused(call) -> bool:
    try:
        call()
    except ApiException as error:
        return error.status == 403
    return False


def assert_never_refused(operator) -> None:
    """Not one API call of the operator (or of kopf under it) was refused."""
    forbidden = [line for line in operator.log().splitlines() if "Forbidden" in line or " 403" in line]
    assert not forbidden, "\n".join(forbidden[:5])


def reconciles_end_to_end(cluster, namespace: str, name: str) -> None:
    apply_run(cluster, namespace, probe_run(name))
    try:
        check_reconciled(cluster, namespace, name)
    finally:
        cluster.kubectl("delete", "bloomrun", name, "-n", namespace, "--wait=false")


def check_reconciled(cluster, namespace: str, name: str) -> None:
    status = wait_for_phase(cluster, namespace, name, "Running")
    assert status["nodes"]["ready"] == 1
    core = client.CoreV1Api(cluster.api())
    pods = core.list_namespaced_pod(namespace, label_selector=f"bloomrun.io/run={name}").items
    assert len(pods) == 1 and pods[0].spec.node_selector["bloomrun.io/pool"] == "a100-80gb"
    # The per-run identity the operator granted (possible only because it holds those rights).
    rbac = client.RbacAuthorizationV1Api(cluster.api())
    assert rbac.list_namespaced_role(namespace, label_selector=f"bloomrun.io/run={name}").items
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    assert events, "the operator posted no Event"


def test_namespaced_release_reconciles_its_namespace_and_is_refused_the_rest(cluster):
    team = cluster.new_namespace("rbac-team")
    other = cluster.new_namespace("rbac-other")
    with chart_release(cluster, {"watchNamespaces": [team]}) as release, \
            running_operator(cluster, release) as operator:
        reconciles_end_to_end(cluster, team, "probe")
        assert_never_refused(operator)

        user = service_account_user(release["namespace"], release["service_account"])
        api = cluster.impersonating(user)
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        assert refused(lambda: core.list_namespaced_secret(team))
        assert refused(lambda: core.read_namespaced_secret("anything", team))
        assert refused(lambda: core.list_namespaced_pod(other))
        assert refused(lambda: core.create_namespaced_config_map(other, {"metadata": {"name": "x"}}))
        assert refused(lambda: custom.list_namespaced_custom_object("bloomrun.io", "v1alpha1", other, "bloomruns"))
        assert refused(lambda: custom.list_cluster_custom_object("bloomrun.io", "v1alpha1", "bloomruns"))
        assert refused(lambda: core.delete_namespace(other))
        assert refused(lambda: core.patch_node("anything", {"metadata": {"labels": {"x": "y"}}}))
        assert not refused(lambda: core.list_namespaced_pod(team))  # the control: allowed


def test_cluster_wide_release_reconciles_any_namespace_but_never_reads_secrets(cluster):
    team = cluster.new_namespace("rbac-any")
    with chart_release(cluster, {}) as release, running_operator(cluster, release) as operator:
        reconciles_end_to_end(cluster, team, "probe")
        assert_never_refused(operator)
        api = cluster.impersonating(service_account_user(release["namespace"], release["service_account"]))
        core = client.CoreV1Api(api)
        assert refused(lambda: core.list_secret_for_all_namespaces())
        assert refused(lambda: core.list_namespaced_secret(team))
        assert refused(lambda: core.delete_namespace(team))
        assert refused(lambda: core.patch_node("anything", {"metadata": {"labels": {"x": "y"}}}))
