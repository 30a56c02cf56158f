"""`bloomctl validate` and the API server agree: what one refuses the other refuses, naming
the field, and whatever the API server accepts never crashes the operator. Hypothesis mutates
valid manifests (the examples and a small one) one field at a time.

validate checks the CRD's rules and the install's (bloomrun/operator/admission.py, with the
chart's defaults); the fuzz namespace has the chart's run policy bound to it, rendered by
helm with the defaults, so the API server checks both too."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kubernetes import client

from bloomrun.operator import admission
from bloomrun.operator.spec import GROUP, PLURAL, VERSION, ManifestError, parse_manifest

from .e2e import REPO, wait_for
from .test_operator_e2e import crd, operator  # noqa: F401  (module fixtures)

pytestmark = [pytest.mark.cluster]
BLOOMCTL = str(Path(sys.executable).parent / "bloomctl")

BASE = {
    "apiVersion": "bloomrun.io/v1alpha1", "kind": "BloomRun", "metadata": {"name": "fuzz"},
    "spec": {
        "model": {"preset": "tiny"},
        "data": {"sources": [{"path": "/data/x"}]},
        "training": {"trainSteps": 10, "globalBatchSize": 32, "microBatchSize": 2},  # 8 or 16 ranks
        "nodes": {"min": 1, "max": 2},
        "checkpointVolume": {"claimName": "fuzz-checkpoints"},  # two nodes share their checkpoints
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
    (("spec", "parallel", "tensor"), st.sampled_from([0, 1, 2, 3, 4, 8, 32])),
    (("spec", "parallel", "pipeline"), st.sampled_from([0, 1, 2, 3, 4, 6, 12])),
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
        assert err.status in (400, 403, 422), err  # 403: the run policy's admission denial
        return yaml.safe_load(err.body)["message"]


def offline_verdict(document) -> str | None:
    """What `bloomctl validate` says: None if it accepts, else its one-line message."""
    try:
        refused = admission.refusal(parse_manifest(document).spec, admission.RunPolicy())
    except ManifestError as err:
        return str(err)
    return refused


@pytest.fixture(scope="module")
def fuzz_namespace(cluster, crd):  # noqa: F811
    namespace = cluster.new_namespace("fuzz")
    policy = bind_run_policy(cluster, namespace)
    yield namespace
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
        cluster.kubectl("delete", kind, policy, "--wait=false", check=False)


def bind_run_policy(cluster, namespace: str) -> str:
    """The chart's run policy with its default values (as `helm template` renders it), bound
    to this namespace alone: other tests' runs share the cluster."""
    from tests.chart.helm import of_kind, render

    policy = next(p for p in of_kind(render(), "ValidatingAdmissionPolicy") if p["metadata"]["name"].endswith("-runs"))
    name = f"{namespace}-runs"
    policy["metadata"] = {"name": name}
    binding = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
               "metadata": {"name": name},
               "spec": {"policyName": name, "validationActions": ["Deny"], "matchResources": {
                   "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}}}
    admissions = client.AdmissionregistrationV1Api(cluster.api())
    admissions.create_validating_admission_policy(policy)
    admissions.create_validating_admission_policy_binding(binding)
    custom = client.CustomObjectsApi(cluster.api())
    probe = copy.deepcopy(BASE) | {"metadata": {"name": "probe"}}
    probe["spec"] = probe["spec"] | {"priorityClassName": "system-node-critical"}
    wait_for(lambda: server_verdict(custom, namespace, probe), 60, "the run policy to be enforced")
    return name


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
    (("spec", "eval"), {"tasks": ["arc_easy"], "taskDataClaimName": "staged"},
     "eval.taskDataClaimName needs eval.taskDataDir"),
    (("spec", "eval"), {"tasks": ["arc_easy"], "maxConcurrent": 0}, "spec.eval.maxConcurrent"),
    (("metadata", "name"), "x" * 41, "metadata.name"),
    (("spec", "suspend"), "true", "spec.suspend"),
    (("spec", "optim"), {"lr": 3.0}, "spec.optim.lr"),
    (("spec", "optim"), {"warmupTokens": 10**6}, "optim.warmupTokens must not be longer than the run"),
    (("spec", "resources"), {"limits": {"cpu": "-1"}}, "spec.resources.limits.cpu"),
    (("spec", "pool"), {"nodeSelector": {"Bad/x": "a"}}, "spec.pool.nodeSelector"),
    (("spec", "pool"), {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}, "spec.pool.tolerations[0]"),
    (("spec", "checkpointVolume"), {"claimName": ""}, "spec.checkpointVolume.claimName"),
    # Two nodes, each with checkpoints in an emptyDir of its own (issue 19).
    (("spec", "checkpointVolume"), {"mountPath": "/ckpt"}, "checkpointVolume.claimName is required when nodes.max > 1"),
    (("metadata", "labels"), {"team": "a b"}, "metadata.labels"),
    (("spec", "parallel"), {"tensor": 3}, "spec.parallel.tensor"),
    (("spec", "parallel"), {"tensor": 8}, "parallel.tensor must divide model.numHeads"),
    (("spec", "parallel"), {"pipeline": 3}, "parallel.pipeline must divide model.numLayers + 2"),
    (("spec", "parallel"), {"tensor": 16, "pipeline": 1}, "parallel.tensor must"),
    # Every world size of the range must split every batch of the ramp.
    (("spec", "nodes"), {"min": 1, "max": 4}, "every world size of nodes.min..nodes.max x gpusPerNode"),
    (("spec", "pool"), {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"topologyKey": "zone", "namespaceSelector": {}}]}}}, "namespaces and namespaceSelector are refused"),
    (("spec", "env"), [{"name": f"V{i}", "value": "x" * 20000} for i in range(2)],
     "spec.env and spec.pool together hold at most 32768 characters"),
    # The install's rules (the chart's policy, default values).
    (("spec", "priorityClassName"), "system-node-critical", "spec.priorityClassName"),
    (("spec", "pool"), {"tolerations": [{"operator": "Exists"}]}, "spec.pool.tolerations"),
    (("spec", "data"), {"sources": [{"path": "/tmp/corpus"}]}, "spec.data.sources"),
])
def test_the_api_server_refuses_bad_manifests_naming_the_field(cluster, fuzz_namespace, path, value, field):
    document = copy.deepcopy(BASE)
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert offline_verdict(document) is not None
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
        offline = offline_verdict(document)
        assert offline is None or ("\n" not in offline and ":" in offline), offline
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


# ------------------------------------------------------------- agreement, both directions

EXAMPLES = [yaml.safe_load((REPO / name).read_text()) for name in ("examples/tiny.yaml", "examples/ablation-1b3-alibi.yaml")]
NAMESPACE = "<the test's namespace>"  # a placeholder: another valid namespace is refused as a mismatch
DELETE = object()  # the mutation that removes the field


def ints(low: int, high: int):
    """Integers in and around [low, high], and magnitudes JSON carries only as floats."""
    return st.one_of(st.integers(low, high), st.integers(low - 2, low + 1), st.integers(high - 1, high + 2),
                     st.sampled_from([2**53, 2**63, -(2**63), 10**20]))


def floats(low: float, high: float):
    return st.one_of(st.floats(low, high), st.sampled_from([low, high, high * 1.5, -1.0, 0.0, 1e300]),
                     st.sampled_from([float("inf"), float("-inf"), float("nan")]))


# Values of the wrong type for any field: strings that look like numbers or booleans,
# booleans for integers, integral floats (which kubectl sends as integers), null, containers.
JUNK = st.one_of(
    st.sampled_from(["true", "false", "1", "1e3", "", "yes", True, False, None, 1, 0, 1.0, 2.5, -1, [], {}, [1], {"a": 1}]),
)
SIZE = st.from_regex(r"[+-]?[0-9.]{0,3}[eEinumkKMGTP]{0,2}[-+]?[0-9]{0,2}", fullmatch=True)
QUANTITY = st.one_of(SIZE, st.sampled_from(["4", "100Gi", "500m", "1.5", ".5", "5.", "1e3", "1E-3", "1K", "1Ki",
                                            "1.5.5", "lots", "-1", "+1", "1" * 65]),
                     ints(0, 2**53 - 1), floats(0, 10))
NAME_PART = r"[A-Za-z0-9._-]{0,5}"
LABEL_KEY = st.one_of(st.from_regex(rf"([a-zA-Z0-9.-]{{0,6}}/)?{NAME_PART}", fullmatch=True),
                      st.sampled_from(["app.kubernetes.io/name", "a" * 63, "a" * 64, "b" * 253 + "/x", "b" * 254 + "/x",
                                       "a\n", "é", "Example.com/x"]))
LABEL_VALUE = st.one_of(st.from_regex(NAME_PART, fullmatch=True),
                        st.sampled_from(["a" * 63, "a" * 64, "a b", "a\n", 1, True, None]))
DNS = st.one_of(st.from_regex(r"[a-z0-9.-]{0,6}", fullmatch=True),
                st.sampled_from(["team-a", "Team", "a_b", "a" * 63, "a" * 64, "a." * 127, "", "a\n", None]))
PATHS = st.sampled_from(["/data/x", "relative/path", "", "/a:b", "/ckpt", "../up", "a/../b", "/tmp/x", "/tmpx",
                         "/checkpoints/c", "/dev/shm/x", "/etc/bloomrun", "/opt/in-image"])


def mapping(keys, values, max_size=3):
    return st.dictionaries(keys, values, max_size=max_size)


CONTROL_PLANE = "node-role.kubernetes.io/control-plane"
NODE_KEY = st.sampled_from(["kubernetes.io/hostname", CONTROL_PLANE, "node-role.kubernetes.io/master", "Bad/x"])
REQUIREMENT = st.fixed_dictionaries({"key": NODE_KEY, "operator": st.sampled_from(
    ["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt", "Near"])}, optional={
    "values": st.lists(st.sampled_from(["a", "7", "-3", "x" * 64, ""]), max_size=2)})
POD_TERM = st.fixed_dictionaries({"topologyKey": st.sampled_from(["zone", "Bad/x", ""])}, optional={
    "labelSelector": st.fixed_dictionaries({}, optional={
        "matchLabels": mapping(LABEL_KEY, LABEL_VALUE, max_size=2),
        "matchExpressions": st.lists(REQUIREMENT, max_size=1)}),
    "namespaces": st.lists(st.just("other"), max_size=1), "namespaceSelector": st.just({}),
    "matchLabelKeys": st.lists(st.just("app"), max_size=1)})
AFFINITY = st.one_of(
    st.fixed_dictionaries({}, optional={
        "nodeAffinity": st.fixed_dictionaries({}, optional={
            "requiredDuringSchedulingIgnoredDuringExecution": st.fixed_dictionaries({"nodeSelectorTerms": st.lists(
                st.fixed_dictionaries({}, optional={"matchExpressions": st.lists(REQUIREMENT, max_size=2),
                                                    "matchFields": st.lists(REQUIREMENT, max_size=1)}), max_size=2)}),
            "preferredDuringSchedulingIgnoredDuringExecution": st.lists(st.fixed_dictionaries({
                "weight": st.sampled_from([0, 1, 100, 101]),
                "preference": st.fixed_dictionaries({"matchExpressions": st.lists(REQUIREMENT, max_size=2)})}),
                max_size=1)}),
        "podAntiAffinity": st.fixed_dictionaries({}, optional={
            "requiredDuringSchedulingIgnoredDuringExecution": st.lists(POD_TERM, max_size=1),
            "preferredDuringSchedulingIgnoredDuringExecution": st.lists(st.fixed_dictionaries({
                "weight": st.sampled_from([1, 50]), "podAffinityTerm": POD_TERM}), max_size=1)})}),
    st.sampled_from([{}, {"podAntiAffinity": {"x": [1.0, None]}}, [], "none"]))
# Node ranges, GPUs and batches around the world-size rule (examples: micro 8 or 2, ramp 32).
RANGES = st.fixed_dictionaries({"min": st.sampled_from([1, 2, 3, 4, 16]), "max": st.sampled_from([1, 2, 4, 8, 19, 80])})
ENV_VALUE = st.sampled_from(["1", "", 1, "x" * 16000, "y" * 32768, "z" * 32769])


# (path, values): fields both sides check, with values on each side of every rule. A path ending
# in a key not in the schema (snake_case spellings, unknown keys) must be refused.
FIELDS = [
    (("metadata", "name"), st.sampled_from(["ok-name", "Bad_Name", "x" * 40, "x" * 41, "9digit", "", "a-", "a.b"])),
    (("metadata", "namespace"), st.sampled_from([NAMESPACE, "Bad_NS", "", "-a", "a" * 64, "a\n", 1, None])),
    (("metadata", "labels"), mapping(LABEL_KEY, LABEL_VALUE)),
    (("metadata", "annotations"), mapping(LABEL_KEY, st.sampled_from(["x", "", 1, True, None]))),
    (("metadata", "labelz"), st.just({"a": "b"})),
    (("metadata", "uid"), st.just("f00")),
    (("spec", "model", "preset"), st.sampled_from(["tiny", "1b3", "176b", "2b", None])),
    (("spec", "model", "numLayers"), ints(1, 512)),
    (("spec", "model", "hiddenSize"), st.one_of(ints(8, 65536), st.sampled_from([60, 64, 66, 96, 130]))),
    (("spec", "model", "numHeads"), st.one_of(ints(1, 1024), st.sampled_from([2, 3, 5, 8]))),
    (("spec", "model", "seqLength"), ints(2, 131072)),
    (("spec", "model", "vocabSize"), ints(2, 1_048_576)),
    (("spec", "model", "position"), st.sampled_from(["alibi", "rotary", "learned", "none", "ALiBi", "sinusoidal"])),
    (("spec", "model", "embeddingLayernorm"), st.sampled_from([True, False, "true", 1])),
    (("spec", "model", "layerNormEpsilon"), floats(0, 1)),
    (("spec", "model", "initStd"), floats(0, 1)),
    (("spec", "model", "embedding_layernorm"), st.just(True)),
    (("spec", "data", "sources"), st.lists(st.fixed_dictionaries({"path": PATHS}, optional={
        "weight": floats(0, 1e6), "name": st.sampled_from(["a", "", 1])}), max_size=2)),
    (("spec", "data", "tokenizer"), st.sampled_from(["/data/t.json", "", None, 1])),
    (("spec", "data", "seed"), ints(0, 2**32 - 1)),
    (("spec", "optim", "lr"), floats(0, 1)),
    (("spec", "optim", "minLr"), floats(0, 1e-2)),
    (("spec", "optim", "warmupTokens"), st.one_of(ints(0, 10**15), st.sampled_from([0, 20480, 307200, 307201]))),
    (("spec", "optim", "decayTokens"), st.one_of(ints(1, 10**15), st.sampled_from([20479, 20480, 375_000_000]))),
    (("spec", "optim", "beta1"), floats(0, 1)),
    (("spec", "optim", "eps"), floats(0, 1)),
    (("spec", "optim", "weightDecay"), floats(0, 10)),
    (("spec", "optim", "gradClip"), floats(0, 1e6)),
    (("spec", "optim", "warmup_tokens"), st.just(10)),
    (("spec", "training", "globalBatchSize"), st.one_of(ints(1, 2**24), st.sampled_from([8, 12, 16, 512, 100, 1024,
                                                                                         192, 12_252_240]))),
    (("spec", "training", "microBatchSize"), ints(0, 65536)),
    (("spec", "training", "rampup"), st.fixed_dictionaries({"start": st.sampled_from([1, 4, 16, 32, 64, 0]),
                                                            "increment": st.sampled_from([1, 4, 32, 96, 0, 16]),
                                                            "samples": st.sampled_from([1, 100, 4800, 2_000_000, 10**14])})),
    (("spec", "training", "trainTokens"), ints(1, 10**15)),
    (("spec", "training", "trainSteps"), ints(1, 10**9)),
    (("spec", "training", "precision"), st.sampled_from(["auto", "bf16", "fp16"])),
    (("spec", "training", "zeroStage"), ints(0, 3)),
    (("spec", "parallel", "tensor"), st.one_of(ints(1, 16), st.sampled_from([2, 3, 4, 8, 16]))),
    (("spec", "parallel", "pipeline"), st.one_of(ints(1, 512), st.sampled_from([2, 3, 4, 6, 12, 24]))),
    (("spec", "training", "seed"), ints(0, 2**32 - 1)),
    (("spec", "training", "compile"), st.sampled_from([True, "false"])),
    (("spec", "training", "nanPolicy"), st.fixed_dictionaries({}, optional={
        "maxConsecutiveBadSteps": ints(1, 1000), "skipStepsAfterRollback": ints(0, 1_000_000)})),
    (("spec", "training", "train_steps"), st.just(5)),
    (("spec", "checkpoint", "everySteps"), st.one_of(ints(1, 10**9), st.none())),
    (("spec", "checkpoint", "everyMinutes"), floats(0, 525_600)),
    (("spec", "checkpoint", "keepLast"), ints(1, 10_000)),
    (("spec", "checkpoint", "dir"), st.sampled_from(["/ckpt", "runs/x"])),  # the launcher's, never the user's
    (("spec", "checkpoint", "initFrom"), st.fixed_dictionaries({}, optional={
        "path": st.sampled_from(["/ckpt/step-5", ""]), "run": st.sampled_from(["other-run", "Bad", ""]),
        "optimizer": st.sampled_from([True, "yes"])})),
    (("spec", "metrics", "port"), ints(0, 65535)),
    (("spec", "metrics", "logEvery"), ints(1, 10**9)),
    (("spec", "image"), st.sampled_from(["ghcr.io/x/y:1", "", "a" * 513])),
    (("spec", "nodes", "min"), ints(1, 1024)),
    (("spec", "nodes", "max"), st.one_of(ints(1, 1024), st.sampled_from([2, 3, 4, 128, 129]))),
    (("spec", "nodes"), RANGES),
    (("spec", "gpusPerNode"), st.one_of(ints(0, 16), st.sampled_from([1, 2, 4, 8]))),
    (("spec", "gpus_per_node"), st.just(8)),
    (("spec", "pool", "nodeSelector"), mapping(LABEL_KEY, LABEL_VALUE)),
    (("spec", "pool", "affinity"), AFFINITY),
    (("spec", "pool", "tolerations"), st.lists(st.fixed_dictionaries({}, optional={
        "key": st.one_of(LABEL_KEY, st.just(""), st.just(CONTROL_PLANE)), "operator": st.sampled_from(["Exists", "Equal", "Maybe"]),
        "value": LABEL_VALUE, "effect": st.sampled_from(["NoSchedule", "NoExecute", "Never"]),
        "tolerationSeconds": ints(0, 10**9)}), max_size=2)),
    (("spec", "resources", "requests"), mapping(st.sampled_from(["cpu", "memory", "nvidia.com/gpu", "example.com/fpga",
                                                                 "Bad/x", "ephemeral-storage"]), QUANTITY)),
    (("spec", "resources", "limits"), mapping(st.sampled_from(["cpu", "memory", "-x"]), QUANTITY)),
    (("spec", "shmSize"), QUANTITY),
    (("spec", "checkpointVolume", "claimName"), DNS),
    (("spec", "checkpointVolume", "mountPath"), PATHS),
    (("spec", "dataVolume", "claimName"), DNS),
    (("spec", "dataVolume", "mountPath"), PATHS),
    (("spec", "restartPolicy", "maxRestarts"), ints(0, 10_000)),
    (("spec", "restartPolicy", "backoffSeconds"), ints(0, 3600)),
    (("spec", "restartPolicy", "retryableExitCodes"), st.lists(ints(1, 255), max_size=3)),
    (("spec", "suspend"), st.sampled_from([True, False, "true", 0])),
    (("spec", "priorityClassName"), st.one_of(DNS, st.sampled_from(["system-node-critical", "system-x", "research"]))),
    (("spec", "queue"), DNS),
    (("spec", "budget", "gpuHours"), floats(0, 1e9)),
    (("spec", "env"), st.lists(st.fixed_dictionaries({"name": st.sampled_from(
        ["NCCL_DEBUG", "RANK", "PET_NNODES", "BLOOMRUN_X", "1BAD", "OK_NAME", "OTHER"])}, optional={
        "value": ENV_VALUE}), max_size=3)),
    (("spec", "eval"), st.fixed_dictionaries({}, optional={
        "tasks": st.sampled_from([["arc_easy"], ["bloomrun_stories_order", "copa"], ["copa", "copa"], ["nope"], []]),
        "suite": st.sampled_from(["bigscience-27", "bigscience-28"]),
        "everyCheckpoints": st.one_of(ints(1, 10**9), st.just(2)), "everyTokens": ints(1, 10**15),
        "limit": ints(1, 10_000_000), "batchSize": ints(1, 4096),
        "taskDataDir": st.sampled_from(["/staged", "relative", ""]), "taskDataClaimName": DNS,
        "gpus": ints(0, 16), "maxConcurrent": ints(1, 64), "backoffLimit": ints(0, 20), "priorityClassName": DNS,
        "pool": st.fixed_dictionaries({}, optional={"nodeSelector": mapping(LABEL_KEY, LABEL_VALUE)}),
        "resources": st.fixed_dictionaries({}, optional={"requests": mapping(st.sampled_from(["cpu", "nvidia.com/gpu"]),
                                                                             QUANTITY)})})),
    (("spec", "bogus"), st.just(1)),
]
REQUIRED = [("spec", "data"), ("spec", "training"), ("spec", "data", "sources"), ("metadata", "name"), ("spec",)]


@st.composite
def mutated_examples(draw):
    """A valid manifest with one field changed (or a required one removed)."""
    document = copy.deepcopy(draw(st.sampled_from(EXAMPLES)))
    if draw(st.integers(0, 19)) == 0:
        path, value = draw(st.sampled_from(REQUIRED)), DELETE
    else:
        path, values = draw(st.sampled_from(FIELDS))
        # Mostly the field's own values. A namespace other than the request's is refused as a
        # mismatch, which validate cannot know, so JUNK (strings such as "yes") is not tried there.
        value = draw(values if path == ("metadata", "namespace") else st.one_of(values, values, values, JUNK))
    target = document
    for key in path[:-1]:
        target = target.setdefault(key, {})
    if value is DELETE:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    return path, document


def as_kubectl_sends(value, namespace: str):
    """The JSON kubectl sends for this YAML: Go's encoder writes a float with an integral
    value as an integer (8.0 as 8); infinity and NaN stay for the client to send as
    invalid JSON, which the API server refuses."""
    if isinstance(value, dict):
        return {k: as_kubectl_sends(v, namespace) for k, v in value.items()}
    if isinstance(value, list):
        return [as_kubectl_sends(v, namespace) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return namespace if value == NAMESPACE else value


def test_validate_and_the_api_server_agree_on_generated_manifests(cluster, fuzz_namespace):
    """Both directions: every generated manifest validate accepts the API server accepts
    (server-side dry-run create, strict field validation), and every one it refuses the API
    server refuses."""
    custom = client.CustomObjectsApi(cluster.api())
    verdicts = {"accepted": 0, "refused": 0}
    disagreements: list[str] = []
    started = time.monotonic()

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(mutated_examples())
    def check(case):
        path, document = case
        sent = as_kubectl_sends(document, fuzz_namespace)
        offline = offline_verdict(sent)
        assert offline is None or "\n" not in offline, offline
        server = server_verdict(custom, fuzz_namespace, sent)
        verdicts["refused" if offline else "accepted"] += 1
        if (offline is None) != (server is None):
            field = ".".join(path)
            disagreements.append(f"{field}: offline {offline or 'accepted'}; API server {server or 'accepted'}; "
                                 f"value {_at(sent, path)!r}")

    check()
    elapsed = time.monotonic() - started
    print(f"\n{sum(verdicts.values())} manifests in {elapsed:.1f} s: {verdicts}, {len(disagreements)} disagreements")
    assert sum(verdicts.values()) >= 1000, verdicts
    assert verdicts["accepted"] >= 200 and verdicts["refused"] >= 200, verdicts  # both directions exercised
    assert not disagreements, "\n".join(disagreements[:40])


def _at(document, path):
    for key in path:
        if not isinstance(document, dict) or key not in document:
            return "(absent)"
        document = document[key]
    return document


# YAML that reaches the API server through kubectl: the transport as_sent mirrors.
KUBECTL_CASES = [
    ("  gpusPerNode: 0", "  gpusPerNode: 0.0", True),  # Go's JSON writes 0.0 as 0
    ("  gpusPerNode: 0", "  gpusPerNode: '0'", False),
    # Pruned, then the default 8 GPUs, which cannot split tiny's 16 sequences into micro-batches of 8.
    ("  gpusPerNode: 0", "  gpusPerNode: null", False),
    ("    lr: 3.0e-3", "    lr: .inf", False),
    ("    lr: 3.0e-3", "    lr: .nan", False),
    ("  nodes:", "  pool: {nodeSelector: {1: a, true: b}}\n  nodes:", True),  # keys become "1", "true"
    ("  name: tiny", "  name: tiny\n  annotations: {released: 2026-01-01}", True),  # a date is its text
    ("  name: tiny", "  name: tiny\n  labels: {team: null}", True),  # a null label value is ""
    ("  name: tiny", "  name: tiny\n  labelz: {team: a}", False),
    ("  gpusPerNode: 0", "  gpus_per_node: 0", False),
    ("    trainSteps: 300", "    trainSteps: 300\n    warmup_tokens: 5", False),
]


@pytest.mark.parametrize("old, new, valid", KUBECTL_CASES)
def test_validate_and_kubectl_agree_on_yaml(cluster, fuzz_namespace, tmp_path, old, new, valid):
    text = (REPO / "examples/tiny.yaml").read_text()
    assert old in text
    path = tmp_path / "run.yaml"
    path.write_text(text.replace(old, new, 1))
    offline = subprocess.run([BLOOMCTL, "validate", str(path)], capture_output=True, text=True)
    server = cluster.kubectl("create", "--dry-run=server", "-n", fuzz_namespace, "-f", str(path), check=False)
    assert (offline.returncode == 0) == valid, offline.stderr
    assert (server.returncode == 0) == valid, server.stderr
