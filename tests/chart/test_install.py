"""The chart on the real test cluster: the apiserver accepts every object, helm installs it
into a namespace that enforces the restricted Pod Security profile, and uninstalls it."""

from __future__ import annotations

import json

import pytest
import yaml
from kubernetes import client

from tests.chart.helm import CHART, render

pytestmark = pytest.mark.cluster

# Kinds whose CRDs the test cluster lacks (the Prometheus Operator's) or that the chart's
# crds/ folder brings along; their shape is covered by test_render.py and test_monitoring.py.
NOT_DRY_RUN = {"CustomResourceDefinition", "ServiceMonitor", "PodMonitor", "PrometheusRule",
               "KopfPeering", "ClusterKopfPeering"}


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_apiserver_accepts_every_rendered_object(cluster, mode):
    namespace = cluster.new_namespace("chart-dry", pod_security="restricted")
    values = {"replicaCount": 2, "dashboard": {"enabled": True}}
    if mode == "namespaced":
        values["watchNamespaces"] = [cluster.new_namespace("chart-watched")]
    objects = [obj for obj in render(values, namespace=namespace) if obj["kind"] not in NOT_DRY_RUN]
    out = cluster.kubectl("apply", "--dry-run=server", "-o", "name", "-f", "-",
                          input=yaml.safe_dump_all(objects))
    assert len(out.stdout.split()) == len(objects)


def test_helm_install_runs_the_operator_under_restricted_pod_security(cluster):
    namespace = cluster.new_namespace("chart", pod_security="restricted")
    release = f"bloomrun-{namespace[-6:]}"
    cluster.helm("install", release, str(CHART), "--namespace", namespace, "--set", "replicaCount=2",
                 "--wait", "--timeout", "120s")
    try:
        apps = client.AppsV1Api(cluster.api())
        deployment = apps.read_namespaced_deployment(f"{release}-bloomrun-operator", namespace)
        # Pod Security admission would have refused the pods of a non-restricted template.
        assert deployment.status.ready_replicas == 2
        crds = client.ApiextensionsV1Api(cluster.api())
        names = {crd.metadata.name for crd in crds.list_custom_resource_definition().items}
        assert {"bloomruns.bloomrun.io", "clusterkopfpeerings.kopf.dev"} <= names
        peering = json.loads(cluster.kubectl("get", "clusterkopfpeering", f"{release}-bloomrun-operator", "-o", "json").stdout)
        assert peering["metadata"]["labels"]["app.kubernetes.io/instance"] == release
        status = json.loads(cluster.helm("status", release, "-n", namespace, "-o", "json").stdout)
        assert status["info"]["status"] == "deployed"
    finally:
        cluster.helm("uninstall", release, "--namespace", namespace, "--wait")
    rbac = client.RbacAuthorizationV1Api(cluster.api())
    assert f"{release}-bloomrun-operator" not in {
        role.metadata.name for role in rbac.list_cluster_role().items}
