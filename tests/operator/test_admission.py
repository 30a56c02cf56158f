"""The install's rules (bloomrun/operator/admission.py): scheduling fields, node count and
data paths in pods, each refusal naming its field; the chart's policy is their CEL twin."""

import pytest

from bloomrun.operator.admission import CHART_FILE, CONTROL_PLANE_KEYS, RunPolicy, refusal, refusals, \
    render_validations, validations
from bloomrun.operator.spec import parse_manifest

from .conftest import manifest
from .test_spec import REPO

CONTROL_PLANE = CONTROL_PLANE_KEYS[0]


def spec(**overrides):
    return parse_manifest(manifest(**overrides)).spec


def node_affinity(key, operator, values=None, preferred=False):
    requirement = {"key": key, "operator": operator, **({"values": values} if values else {})}
    term = {"matchExpressions": [requirement]}
    if preferred:
        return {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference": term}]}}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


@pytest.mark.parametrize("overrides, expected", [
    ({"priorityClassName": "system-node-critical"}, "spec.priorityClassName: 'system-node-critical' is a system"),
    ({"pool": {"tolerations": [{"operator": "Exists"}]}}, "spec.pool.tolerations[0]: a toleration without a key "
                                                          "tolerates every taint"),
    ({"pool": {"tolerations": [{"key": CONTROL_PLANE, "operator": "Exists", "effect": "NoSchedule"}]}},
     f"spec.pool.tolerations[0]: taint key '{CONTROL_PLANE}' is denied"),
    ({"pool": {"nodeSelector": {CONTROL_PLANE: ""}}}, f"spec.pool.nodeSelector: node label key '{CONTROL_PLANE}'"),
    ({"pool": {"affinity": node_affinity(CONTROL_PLANE, "Exists")}},
     f"spec.pool.affinity.nodeAffinity: node label key '{CONTROL_PLANE}' (Exists) is denied"),
    ({"pool": {"affinity": node_affinity("node-role.kubernetes.io/master", "In", [""], preferred=True)}},
     "spec.pool.affinity.nodeAffinity: node label key 'node-role.kubernetes.io/master' (In)"),
    ({"nodes": {"min": 129, "max": 129}, "gpusPerNode": 0,
      "training": {"trainSteps": 5, "globalBatchSize": 129, "microBatchSize": 1}}, "spec.nodes.max: 129 nodes, this install allows at most 128"),
    ({"data": {"sources": [{"path": "../other-team/corpus"}]}}, "spec.data.sources[0].path: '../other-team/corpus' "
                                                                "has a '..' segment"),
    ({"data": {"sources": [{"path": "/data/x"}], "tokenizer": "/tmp/tok.json"}},
     "spec.data.tokenizer: '/tmp/tok.json' is under /tmp, which every worker pod mounts over"),
    ({"data": {"sources": [{"path": "/checkpoints/corpus"}]}}, "spec.data.sources[0].path: '/checkpoints/corpus' is "
                                                               "under /checkpoints"),
    ({"dataVolume": {"claimName": "c", "mountPath": "/tmp/data"}}, "spec.dataVolume.mountPath: '/tmp/data' overlaps /tmp"),
    ({"dataVolume": {"mountPath": "/ckpt/data"}, "checkpointVolume": {"mountPath": "/ckpt"}},
     "spec.dataVolume.mountPath: '/ckpt/data' overlaps checkpointVolume.mountPath '/ckpt'"),
])
def test_the_default_rules_refuse_naming_the_field(overrides, expected):
    found = refusals(spec(**overrides), RunPolicy())
    assert len(found) == 1 and found[0].startswith(expected), found


@pytest.mark.parametrize("overrides", [
    {"priorityClassName": "research-low"},
    {"pool": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}], "nodeSelector": {"pool": "a100"}}},
    # Steering away from the control plane is what a careful manifest does.
    {"pool": {"affinity": node_affinity(CONTROL_PLANE, "DoesNotExist")}},
    {"pool": {"affinity": node_affinity(CONTROL_PLANE, "NotIn", ["x"])}},
    {"nodes": {"min": 128, "max": 128}, "gpusPerNode": 0,
     "training": {"trainSteps": 5, "globalBatchSize": 128, "microBatchSize": 1}},
    # On the data volume (relative, or absolute under its mount), or in the image elsewhere.
    {"data": {"sources": [{"path": "corpus/x"}, {"path": "/data/y"}, {"path": "/opt/corpora/z"}],
              "tokenizer": "tok..json"}, "dataVolume": {"claimName": "corpora"}},
    {"data": {"sources": [{"path": "/tmpfoo/x"}]}},  # a sibling of /tmp, not under it
])
def test_what_the_default_rules_allow(overrides):
    assert refusals(spec(**overrides), RunPolicy()) == []


def test_an_install_may_allow_listed_classes_only_and_deny_nothing():
    strict = RunPolicy(allowed_priority_classes=("research",), max_nodes=2)
    assert refusal(spec(priorityClassName="research"), strict) is None
    assert "not one of this install's PriorityClasses (research)" in refusal(spec(priorityClassName="prod"), strict)
    lenient = RunPolicy(allowed_priority_classes=("system-cluster-critical",), denied_taint_keys=(),
                        denied_node_label_keys=())
    anything = spec(priorityClassName="system-cluster-critical",
                    pool={"tolerations": [{"operator": "Exists"}], "nodeSelector": {CONTROL_PLANE: ""}})
    assert refusal(anything, lenient) is None
    with pytest.raises(ValueError, match="maxNodes must be an integer 1-1024, got 2000"):
        RunPolicy(max_nodes=2000)
    with pytest.raises(ValueError, match="denied_taint_keys must be a list of names"):
        RunPolicy(denied_taint_keys=("",))


def test_every_refusal_is_reported_on_one_line():
    message = refusal(spec(priorityClassName="system-node-critical", pool={"tolerations": [{"operator": "Exists"}]}),
                      RunPolicy())
    assert message.count("; ") == 1 and "\n" not in message


def test_the_examples_pass_the_default_rules():
    from bloomrun.operator.spec import load_manifest

    for name in ("examples/tiny.yaml", "examples/ablation-1b3-alibi.yaml"):
        assert refusals(load_manifest(REPO / name).spec, RunPolicy()) == [], name


def test_the_chart_carries_the_generated_policy():
    assert (REPO / CHART_FILE).read_text() == render_validations(), "run `make chart-crds`"
    assert all(v["message"].startswith("spec.") for v in validations())


def test_the_chart_defaults_are_the_operators_and_validates_defaults():
    import yaml

    values = yaml.safe_load((REPO / "charts/bloomrun-operator/values.yaml").read_text())["runPolicy"]
    default = RunPolicy()
    assert values["allowedPriorityClasses"] == list(default.allowed_priority_classes)
    assert values["deniedTaintKeys"] == list(default.denied_taint_keys)
    assert values["deniedNodeLabelKeys"] == list(default.denied_node_label_keys)
    assert values["maxNodes"] == default.max_nodes
