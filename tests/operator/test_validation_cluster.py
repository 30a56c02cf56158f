"""The API server refuses what `bloomctl validate` refuses, naming the field, and whatever
it accepts never crashes the operator. Hypothesis mutates a valid manifest field by field."""

from __future__ import annotations

import copy
import uuid

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client

from bloomrun.operator.spec import GROUP, PLURAL, VERSION, ManifestError, parse_manifest

from .e2e import REPO, wait_for
from .test_operator_e2e import crd, operator  # noqa: F401  (module fixtures)

pytestmark = [pytest.mark.cluster]

BASE = {
    "apiVersion": "bloomrun.io/v1alpha1", "kind": "BloomRun", "metadata": {"name": "fuzz"},
    "spec": {
        "model": {"preset": "tiny"},
        "data": {"sources": [{"path": "/data/x"}]},
        "training": {"trainSteps": 10, "globalBatchSize": 8, "microBatchSize": 2},
        "nodes": {"min": 1, "max": 2},
        # Nowhere to run: accepted runs stay Pending and take no GPUs from other tests.
        "pool": {"nodeSelector": {"bloomrun.io/pool": "nowhere"}},
    },
}

# (path, values): each a field the API server and pydantic both check, with good and bad values.
MUTATIONS = [
    (("spec", "nodes", "min"), st.integers(-1, 1100)),
    (("spec", "nodes", "max"), st.integers(0, 1100)),
    (("spec", "gpusPerNode"), st.integers(-1, 20)),
    (("spec", "model", "hiddenSize"), st.sampled_from([8, 60, 64, 66, 96, 128, 130])),
    (("spec", "model", "numHeads"), st.sampled_from([1, 2, 3, 4, 5, 8])),
    (("spec", "model", "position"), st.sampled_from(["alibi", "rotary", "learned", "none", "ALiBi", "sinusoidal"])),
    (("spec", "model", "preset"), st.sampled_from(["tiny", "1b3", "176b", "2b"])),
    (("spec", "training", "microBatchSize"), st.integers(0, 9)),
    (("spec", "training", "trainTokens"), st.integers(-1, 10**12)),
    (("spec", "training", "zeroStage"), st.integers(-1, 4)),
    (("spec", "optim", "lr"), st.floats(-1e-3, 1e-2, allow_nan=False)),
    (("spec", "optim", "minLr"), st.floats(0, 1e-2, allow_nan=False)),
    (("spec", "restartPolicy", "maxRestarts"), st.integers(-2, 20)),
    (("spec", "restartPolicy", "retryableExitCodes"), st.lists(st.integers(-1, 300), max_size=3)),
    (("spec", "budget", "gpuHours"), st.floats(-1, 100, allow_nan=False)),
    (("spec", "env"), st.lists(st.fixed_dictionaries({"name": st.sampled_from(
        ["NCCL_DEBUG", "RANK", "MASTER_ADDR", "PET_NNODES", "BLOOMRUN_X", "1BAD", "OK_NAME"]),
        "value": st.just("1")}), max_size=2, unique_by=lambda e: e["name"])),
    (("spec", "resources", "limits"), st.dictionaries(st.sampled_from(["cpu", "memory", "nvidia.com/gpu"]),
                                                     st.sampled_from(["4", "100Gi", "lots", "1.5"]), max_size=2)),
    (("spec", "pool", "tolerations"), st.lists(st.fixed_dictionaries(
        {"key": st.just("k"), "operator": st.sampled_from(["Exists", "Equal", "Maybe"])}), max_size=1)),
    (("spec", "checkpointVolume", "mountPath"), st.sampled_from(["/ckpt", "relative/path", "/a:b"])),
    (("spec", "checkpoint", "dir"), st.sampled_from(["/ckpt", "runs/x"])),  # the launcher's, never the user's
    (("spec", "unknownField"), st.just(1)),
    (("metadata", "name"), st.sampled_from(["ok-name", "Bad_Name", "x" * 41, "9starts-with-digit"])),
]


@st.composite
def manifests(draw):
    document = copy.deepcopy(BASE)
    for index in sorted(draw(st.sets(st.integers(0, len(MUTATIONS) - 1), min_size=1, max_size=3))):
        path, values = MUTATIONS[index]
        target = document
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = draw(values)
    document["metadata"].setdefault("name", "fuzz")
    return document


def server_verdict(custom, namespace, document) -> str | None:
    """None if the API server accepts the object (dry run), else its message."""
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, document,
                                               dry_run="All", field_validation="Strict")
        return None
    except client.ApiException as err:
        assert err.status in (400, 422), err
        return yaml.safe_load(err.body)["message"]


@pytest.fixture(scope="module")
def fuzz_namespace(cluster, crd):  # noqa: F811
    namespace = cluster.new_namespace("fuzz")
    yield namespace
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")


@pytest.mark.parametrize("example", ["examples/tiny.yaml", "examples/ablation-1b3-alibi.yaml"])
def test_the_examples_are_accepted_by_the_api_server(cluster, fuzz_namespace, example):
    document = yaml.safe_load((REPO / example).read_text())
    assert server_verdict(client.CustomObjectsApi(cluster.api()), fuzz_namespace, document) is None


@pytest.mark.parametrize("path, value, field", [
    (("spec", "nodes"), {"min": 3, "max": 2}, "spec.nodes"),
    (("spec", "model"), {"preset": "tiny", "hiddenSize": 66}, "spec.model"),
    (("spec", "env"), [{"name": "RANK", "value": "0"}], "spec.env[0]"),
    (("spec", "training"), {"trainSteps": 5, "trainTokens": 5}, "spec.training"),
    (("spec", "model"), {"position": "sinusoidal"}, "spec.model.position"),
    (("spec", "gpusPerNode"), 17, "spec.gpusPerNode"),
    (("spec", "checkpoint"), {"dir": "/mine"}, "checkpoint.dir is set by the launcher"),
    (("spec", "bogus"), True, "spec.bogus"),
    (("metadata", "name"), "x" * 41, "metadata.name"),
])
def test_the_api_server_refuses_bad_manifests_naming_the_field(cluster, fuzz_namespace, path, value, field):
    document = copy.deepcopy(BASE)
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ManifestError):
        parse_manifest(document)
    message = server_verdict(client.CustomObjectsApi(cluster.api()), fuzz_namespace, document)
    assert message is not None and field in message, message


def test_generated_manifests_refused_offline_are_refused_by_the_api_server_and_none_crashes_the_operator(
        cluster, fuzz_namespace, operator):  # noqa: F811
    custom = client.CustomObjectsApi(cluster.api())
    accepted: list[str] = []
    disagreements: list[str] = []
    verdicts = {"refused": 0, "accepted": 0}

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(manifests())
    def check(document):
        try:
            parse_manifest(document)
            offline = None
        except ManifestError as err:
            offline = str(err)
            assert offline and "\n" not in offline and ":" in offline
        server = server_verdict(custom, fuzz_namespace, document)
        verdicts["refused" if offline else "accepted"] += 1
        if offline is not None:
            assert server is not None, f"offline refused ({offline}) but the API server accepted {document}"
            assert "spec" in server or "metadata.name" in server, server
        elif server is not None:
            disagreements.append(f"{server}")
        if server is None and len(accepted) < 8:
            document = copy.deepcopy(document)
            document["metadata"]["name"] = f"fuzz-{uuid.uuid4().hex[:8]}"
            custom.create_namespaced_custom_object(GROUP, VERSION, fuzz_namespace, PLURAL, document)
            accepted.append(document["metadata"]["name"])

    check()
    assert verdicts["refused"] >= 10 and verdicts["accepted"] >= 5, verdicts  # both sides exercised
    # What the API server accepts the operator handles: a phase for each, and it stays up.
    for name in accepted:
        wait_for(lambda: (custom.get_namespaced_custom_object(GROUP, VERSION, fuzz_namespace, PLURAL, name)
                          .get("status") or {}).get("phase"), 30, f"a phase for {name}")
    assert operator.child.alive(), operator.child.log_tail()
    assert "Traceback" not in operator.child.log.read_text(), operator.child.log_tail(60)
    # Pydantic's lax mode accepts a few things the API server's types do not; none expected here.
    assert not disagreements, disagreements
