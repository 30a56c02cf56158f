"""Rendering the chart with the test cluster's pinned helm, for the chart's tests."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import yaml

from tests.cluster import binaries

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "bloomrun-operator"
RULES_SOURCE = CHART / "rules" / "bloomrun-alerts.yaml"
DASHBOARD_SOURCE = CHART / "dashboards" / "bloomrun.json"
RELEASE = "br"
NAMESPACE = "bloomrun-system"


def tool(name: str) -> str:
    """Path of a pinned binary of the test cluster's tool set (helm, promtool, ...)."""
    return str(binaries.ensure_built() / name)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([tool("helm"), *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stderr}")
    return out


def render(values: dict | None = None, namespace: str = NAMESPACE, release: str = RELEASE) -> list[dict]:
    """`helm template` of the chart with these values, as a list of objects."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(values or {}, file)
        file.flush()
        out = helm("template", release, str(CHART), "--namespace", namespace,
                   "--include-crds", "--values", file.name)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def render_error(values: dict) -> str:
    """helm's error message for values it must refuse."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(values, file)
        file.flush()
        out = helm("template", RELEASE, str(CHART), "--values", file.name, check=False)
    assert out.returncode != 0, f"helm accepted {values}"
    return out.stderr


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def only(objects: list[dict], kind: str) -> dict:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def rendered_rules(values: dict | None = None) -> dict:
    """The rule groups the chart's PrometheusRule carries: a Prometheus rule file."""
    merged = {"prometheusRule": {"enabled": True, **(values or {})}}
    return only(render(merged), "PrometheusRule")["spec"]
