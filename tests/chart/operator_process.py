"""The real operator (`tests/operator/e2e.Operator`) in a chart test, running with the
identity and the arguments the chart gives it."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from tests.chart.helm import CHART, render
from tests.cluster.nodes import POOLS
from tests.cluster.processes import wait_until
from tests.operator.e2e import Operator


@contextmanager
def chart_release(cluster, values: dict) -> Iterator[dict]:
    """`helm install`s the chart into a fresh namespace and yields what a test needs:
    release, namespace and the operator's ServiceAccount. Uninstalled afterwards."""
    namespace = cluster.new_namespace("chart-op", pod_security="restricted")
    release = f"br-{namespace[-6:]}"
    values_file = Path(cluster.layout.root) / f"values-{release}.yaml"
    values_file.write_text(yaml.safe_dump(values))
    cluster.helm("install", release, str(CHART), "--namespace", namespace, "--values", str(values_file))
    try:
        yield {"release": release, "namespace": namespace,
               "service_account": f"{release}-bloomrun-operator", "values": values}
    finally:
        cluster.helm("uninstall", release, "--namespace", namespace, "--wait")


def deployment_args(values: dict) -> list[str]:
    """The operator arguments the chart's Deployment passes for these values."""
    objects = render(values)
    deployment = next(obj for obj in objects if obj["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


@contextmanager
def running_operator(cluster, release: dict, metrics_port: int | None = None) -> Iterator[Operator]:
    """Runs the operator as the release's ServiceAccount (a real token, not admin
    credentials), with the chart's arguments except the ports, which must be free here."""
    kubeconfig = cluster.token_kubeconfig(release["namespace"], release["service_account"])
    args = [arg for arg in deployment_args(release["values"])
            if not arg.startswith(("--metrics-port=", "--liveness="))]
    operator = Operator(cluster, *args, kubeconfig=kubeconfig, metrics_port=metrics_port, timer_interval=2)
    try:
        yield operator
    finally:
        operator.stop()


def probe_run(name: str, gpu_hours_budget: float | None = None) -> dict:
    """A small BloomRun on the simulated A100-80GB pool: one node of 8 GPUs."""
    pool = POOLS["a100-80gb"]
    spec = {
        "model": {"preset": "tiny"},
        "data": {"sources": [{"path": "/data/tiny"}]},
        "training": {"trainSteps": 20, "globalBatchSize": 16, "microBatchSize": 2},  # 8 ranks x 2
        "nodes": {"min": 1, "max": 1},
        "gpusPerNode": 8,
        "pool": {"nodeSelector": pool.selector, "tolerations": pool.tolerations},
    }
    if gpu_hours_budget:
        spec["budget"] = {"gpuHours": gpu_hours_budget}
    return {"apiVersion": "bloomrun.io/v1alpha1", "kind": "BloomRun", "metadata": {"name": name}, "spec": spec}


def apply_run(cluster, namespace: str, manifest: dict) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def run_status(cluster, namespace: str, name: str) -> dict:
    out = cluster.kubectl("get", "bloomrun", name, "-n", namespace, "-o", "json")
    return json.loads(out.stdout).get("status") or {}


def wait_for_phase(cluster, namespace: str, name: str, phase: str, timeout: float = 90) -> dict:
    def reached():
        status = run_status(cluster, namespace, name)
        return status if status.get("phase") == phase else None
    return wait_until(reached, timeout, f"BloomRun {namespace}/{name} {phase}", 1.0)
