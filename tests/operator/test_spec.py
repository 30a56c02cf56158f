"""The BloomRun spec: one source of truth with the trainer, one-line errors naming fields."""

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bloomrun.operator.spec import MAX_NODE_COUNTS, BloomRunSpec, ManifestError, load_manifest, parse_manifest
from bloomrun.trainer.config import MAX_GLOBAL_BATCH, CheckpointConfig, TrainerConfig
from bloomrun.trainer.schedule import check_divisible, global_batch_size_at

from .conftest import manifest

REPO = Path(__file__).resolve().parents[2]


def test_a_local_only_manifest_is_a_valid_bloomrun_with_cluster_defaults():
    run = parse_manifest(manifest())
    assert run.spec.nodes.min == run.spec.nodes.max == 1
    assert run.spec.gpus_per_node == 8 and run.spec.suspend is False
    assert isinstance(run.spec.trainer_config(), TrainerConfig)


def test_spec_is_the_trainer_config_plus_cluster_fields():
    assert issubclass(BloomRunSpec, TrainerConfig)
    assert set(TrainerConfig.model_fields) < set(BloomRunSpec.model_fields)


def test_trainer_config_is_the_specs_sections_without_the_cluster_fields():
    run = parse_manifest(manifest(checkpoint={"everySteps": 5}))
    config = run.spec.trainer_config()
    assert type(config) is TrainerConfig and type(config.checkpoint) is CheckpointConfig
    assert config.checkpoint.every_steps == 5 and config.checkpoint.dir is None
    dumped = config.model_dump(by_alias=True, mode="json")
    assert "checkpointVolume" not in dumped and TrainerConfig.model_validate(dumped) == config


@pytest.mark.parametrize("overrides, expected", [
    ({"nodes": {"min": 4, "max": 2}}, "spec.nodes: min (4) must not exceed max (2)"),
    ({"model": {"preset": "tiny", "hiddenSize": 66}}, "spec.model: hiddenSize (66) must be divisible by numHeads (4)"),
    ({"env": [{"name": "MASTER_ADDR", "value": "x"}]}, "spec.env.0.name: MASTER_ADDR is reserved"),
    ({"env": [{"name": "TORCHELASTIC_RUN_ID", "value": "x"}]}, "spec.env.0.name: TORCHELASTIC_RUN_ID is reserved"),
    ({"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, "spec.env: duplicate env names: A"),
    ({"gpusPerNode": 17}, "spec.gpusPerNode: Input should be less than or equal to 16"),
    ({"resources": {"limits": {"nvidia.com/gpu": 8}}}, "spec.resources: set GPUs with spec.gpusPerNode"),
    ({"resources": {"requests": {"memory": "lots"}}}, "spec.resources.requests.memory: String should match pattern"),
    ({"restartPolicy": {"maxRestarts": -1}}, "spec.restartPolicy.maxRestarts: Input should be greater than or equal to 0"),
    ({"pool": {"tolerations": [{"operator": "Maybe"}]}}, "spec.pool.tolerations.0.operator: Input should be"),
    ({"budget": {"gpuHours": 0}}, "spec.budget.gpuHours: Input should be greater than 0"),
    ({"imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy: Input should be 'Always', 'IfNotPresent' or 'Never'"),
    ({"imagePullPolcy": "Always"}, "spec.imagePullPolcy: unknown field"),
    # The launcher decides it (it used to be overwritten silently).
    ({"checkpoint": {"dir": "/mine"}}, "spec.checkpoint.dir: set by the launcher, not the manifest"),
])
def test_bad_specs_are_refused_with_the_field_named(overrides, expected):
    with pytest.raises(ManifestError) as err:
        parse_manifest(manifest(**overrides))
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)


def test_several_nodes_need_a_checkpoint_claim_and_one_node_may_keep_its_empty_dir():
    """Without a claim each node's checkpoints are in its own emptyDir: after a restart the
    nodes would hold different checkpoints (or none) and could not resume together."""
    with pytest.raises(ManifestError) as err:
        parse_manifest(manifest(nodes={"min": 1, "max": 2}, checkpointVolume={"mountPath": "/ckpt"}))
    assert str(err.value).startswith("spec: checkpointVolume.claimName is required when nodes.max > 1"), err.value
    assert "nodes.max is 2" in str(err.value)
    one_node = parse_manifest(manifest(nodes={"min": 1, "max": 1}, checkpointVolume={"mountPath": "/ckpt"}))
    assert one_node.spec.checkpoint_volume.claim_name is None
    shared = parse_manifest(manifest(nodes={"min": 2, "max": 3}, checkpointVolume={"claimName": "ckpt"}))
    assert shared.spec.checkpoint_volume.claim_name == "ckpt"


@pytest.mark.parametrize("document, expected", [
    ({**manifest(), "apiVersion": "bloomrun.io/v1"}, "apiVersion: expected 'bloomrun.io/v1alpha1'"),
    ({**manifest(), "kind": "Job"}, "kind: expected 'BloomRun'"),
    (manifest(name="Bad_Name"), "metadata.name: String should match pattern"),
    (manifest(name="a" * 41), "metadata.name: String should have at most 40 characters"),
    ([1, 2], "a BloomRun manifest is a mapping"),
])
def test_bad_documents_are_refused(document, expected):
    with pytest.raises(ManifestError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        parse_manifest(document)


def test_load_manifest_names_the_file_and_the_yaml_problem(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        load_manifest(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: bloomrun.io/v1alpha1\nspec: [unclosed\n")
    with pytest.raises(ManifestError, match=r"broken.yaml: line \d+, column \d+: invalid YAML"):
        load_manifest(broken)
    two = tmp_path / "two.yaml"
    two.write_text("a: 1\n---\nb: 2\n")
    with pytest.raises(ManifestError, match="expected one YAML document, found 2"):
        load_manifest(two)


def meta(**fields):
    document = manifest()
    document["metadata"].update(fields)
    return document


@pytest.mark.parametrize("document, expected", [
    # Types the API server refuses are refused, not coerced (pydantic's strict mode).
    (manifest(suspend="true"), "spec.suspend: Input should be a valid boolean"),
    (manifest(gpusPerNode="8"), "spec.gpusPerNode: Input should be a valid integer"),
    (manifest(nodes={"min": True}), "spec.nodes.min: Input should be a valid integer"),
    (manifest(optim={"lr": "2e-4"}), "spec.optim.lr: Input should be a valid number"),
    (manifest(resources={"limits": {"cpu": 1.5}}), "spec.resources.limits.cpu: Input should be a valid string"),
    # Keys the API server refuses: snake_case spellings, unknown metadata.
    (manifest(gpus_per_node=8), "spec.gpus_per_node: unknown field"),
    (manifest(training={"train_steps": 5}), "spec.training.train_steps: unknown field"),
    (meta(labelz={"a": "b"}), "metadata.labelz: unknown field"),
    # What JSON cannot carry, and absurd magnitudes.
    (manifest(optim={"lr": float("inf")}), "spec.optim.lr: inf is not a number JSON can carry"),
    (manifest(optim={"lr": float("nan")}), "spec.optim.lr: nan is not a number JSON can carry"),
    (manifest(optim={"lr": 3.0}), "spec.optim.lr: Input should be less than or equal to 1"),
    (manifest(training={"trainSteps": 10**10}), "spec.training.trainSteps: Input should be less than or equal to"),
    (manifest(training={"trainTokens": 10**16}), "spec.training.trainTokens: Input should be less than or equal to"),
    (manifest(data={"sources": [{"path": "a"}], "seed": 2**63}), "spec.data.seed: Input should be less than"),
    # Kubernetes grammar.
    (manifest(resources={"limits": {"memory": "-1Gi"}}), "spec.resources.limits.memory: String should match"),
    (manifest(resources={"limits": {"memory": -1}}), "spec.resources.limits.memory: a quantity is a non-negative integer"),
    (manifest(resources={"limits": {"memory": "1.5.5"}}), "spec.resources.limits.memory: String should match"),
    (manifest(resources={"limits": {"memory": "1K"}}), "spec.resources.limits.memory: String should match"),
    (manifest(shmSize="1" * 65), "spec.shmSize: Value should have at most 64"),
    (manifest(pool={"nodeSelector": {"zone": "a b"}}), "spec.pool.nodeSelector.zone: String should match"),
    (manifest(pool={"nodeSelector": {"Example.com/zone": "a"}}), "spec.pool.nodeSelector.Example.com/zone.[key]: "
                                                                  "key 'Example.com/zone' must be"),
    (manifest(pool={"nodeSelector": {"zone": "x" * 64}}), "spec.pool.nodeSelector.zone: String should have at most 63"),
    (manifest(pool={"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}),
     "spec.pool.tolerations.0: operator Exists takes no value"),
    (manifest(pool={"tolerations": [{"operator": "Equal", "value": "v"}]}),
     "spec.pool.tolerations.0: a toleration without a key must use operator Exists"),
    (manifest(pool={"tolerations": [{"key": "k", "tolerationSeconds": 5}]}),
     "spec.pool.tolerations.0: tolerationSeconds needs effect NoExecute"),
    (manifest(queue="Team_A"), "spec.queue: String should match pattern"),
    (manifest(priorityClassName="High"), "spec.priorityClassName: String should match pattern"),
    (meta(namespace="Team_A"), "metadata.namespace: String should match pattern"),
    (meta(labels={"team": "a b"}), "metadata.labels.team: String should match pattern"),
    (meta(labels={"-team": "a"}), "metadata.labels.-team.[key]: key '-team' must be a qualified name"),
    (meta(annotations={"A_b/x": "1"}), "metadata.annotations: key 'A_b/x' must be a qualified name"),
    (meta(annotations={"a": "x" * 300_000}), "metadata.annotations: annotations take 300001 bytes"),
    # Empty strings that would silently mean "absent".
    (manifest(data={"sources": [{"path": "a"}], "tokenizer": ""}), "spec.data.tokenizer: String should have at least 1"),
    (manifest(checkpointVolume={"claimName": ""}), "spec.checkpointVolume.claimName: String should have at least 1"),
    (manifest(dataVolume={"claimName": ""}), "spec.dataVolume.claimName: String should have at least 1"),
    # Schedule contradictions, the fields named.
    (manifest(optim={"warmupTokens": 10**6}), "spec: optim.warmupTokens (1000000) is longer than the run "
                                              "(training.trainSteps x globalBatchSize x model.seqLength: 20 x 48 x 64)"),
    (manifest(training={"trainTokens": 1000}, optim={"warmupTokens": 2000}),
     "spec: optim.warmupTokens (2000) is longer than the run (training.trainTokens: 1000)"),
    (manifest(optim={"warmupTokens": 100, "decayTokens": 50}),
     "spec.optim: decayTokens (50) must not be shorter than warmupTokens (100)"),
    (manifest(training={"trainSteps": 2, "globalBatchSize": 8, "microBatchSize": 2,
                        "rampup": {"start": 2, "increment": 2, "samples": 100}}, gpusPerNode=0),
     "spec: training.rampup.samples (100) is longer than the run (16 samples"),
])
def test_what_the_api_server_refuses_is_refused_offline(document, expected):
    with pytest.raises(ManifestError) as err:
        parse_manifest(document)
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("document", [
    manifest(resources={"requests": {"cpu": 4, "memory": "100Gi", "example.com/fpga": "1", "ephemeral-storage": "5e3"}},
             shmSize=".5Ki"),
    manifest(gpusPerNode=8.0),  # kubectl sends YAML's 8.0 as 8, an integer to the API server too
    manifest(optim={"lr": 1}),  # an integer is a number
    manifest(pool={"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "zone": ""},
                   "tolerations": [{"operator": "Exists"}, {"key": "k", "value": "v", "effect": "NoExecute",
                                                            "tolerationSeconds": 30}]}),
    meta(labels={"app.kubernetes.io/name": "x", "a": ""}, annotations={"Note": "x", "example.com/a": "1"},
         uid="u", resourceVersion="1", generation=1, creationTimestamp="2026-01-01T00:00:00Z"),
    manifest(optim={"warmupTokens": 20 * 48 * 64}),  # exactly the run
    manifest(training={"trainTokens": 1000}),  # the paper's default warmup is not held against a small run
    # The API server drops a null where the schema has no nullable (then defaults it), and
    # reads a null metadata field as its zero value.
    manifest(gpusPerNode=None, env=None, pool={"nodeSelector": {"a": None}}),
    meta(namespace="", labels={"a": None}, uid=None),
])
def test_what_the_api_server_accepts_is_accepted_offline(document):
    parse_manifest(document)


def test_a_duplicate_key_is_refused_with_its_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("apiVersion: bloomrun.io/v1alpha1\nkind: BloomRun\nmetadata: {name: a}\n"
                    "spec:\n  suspend: false\n  suspend: true\n")
    with pytest.raises(ManifestError, match=r"dup.yaml: line 6, column 3: invalid YAML: duplicate key 'suspend'"):
        load_manifest(path)


def test_yaml_keys_and_dates_are_read_as_kubectl_sends_them(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("apiVersion: bloomrun.io/v1alpha1\nkind: BloomRun\n"
                    "metadata: {name: a, annotations: {released: 2026-01-01}}\n"
                    "spec: {data: {sources: [{path: a}]}, training: {trainSteps: 5},"
                    " pool: {nodeSelector: {2: 'yes', true: 'x'}}}\n")
    run = load_manifest(path)
    assert run.metadata.annotations == {"released": "2026-01-01"}
    assert run.spec.pool.node_selector == {"2": "yes", "true": "x"}


# ------------------------------------------------------------ world sizes x ramp-up


def sized(nodes, gpus, micro, batch, rampup=None):
    training = {"trainSteps": 10**6, "globalBatchSize": batch, "microBatchSize": micro}
    if rampup:
        training["rampup"] = dict(zip(("start", "increment", "samples"), rampup))
    return manifest(nodes=dict(zip(("min", "max"), nodes)), gpusPerNode=gpus, training=training)


def steps_batches(training) -> set[int]:
    """Every global batch the trainer's own schedule steps with, walked step by step."""
    batches, consumed = set(), 0
    end = training.rampup.samples if training.rampup else 0
    while True:
        batches.add(global_batch_size_at(consumed, training))
        if consumed >= end:  # past the ramp: globalBatchSize from here on
            return batches
        consumed += global_batch_size_at(consumed, training)


def test_the_ablation_example_runs_at_every_size_and_stage_it_allows():
    spec = load_manifest(REPO / "examples/ablation-1b3-alibi.yaml").spec
    batches = steps_batches(spec.training)
    assert batches == set(range(32, 513, 32))  # the paper's ramp, every stage reached
    assert spec.nodes.max > spec.nodes.min  # still elastic
    for nodes in range(spec.nodes.min, spec.nodes.max + 1):
        for batch in batches:  # the trainer's own check, at every world size the range allows
            check_divisible(batch, nodes * spec.gpus_per_node, spec.training.micro_batch_size)


def test_the_old_ablation_sizes_are_refused_naming_each_node_count_and_batch():
    # 4-8 nodes x 8 GPUs, micro 4, 32 -> 512 by 32: the trainer raised at every size.
    with pytest.raises(ManifestError) as err:
        parse_manifest(sized((4, 8), 8, 4, 512, (32, 32, 2_000_000)))
    message = str(err.value)
    assert message.startswith("spec: nodes 4-8 x 8 GPUs, microBatchSize 4: 4 nodes = 32 ranks need multiples of "
                              "128, not 32, 64, 96; 5 nodes = 40 ranks need multiples of 160, not 32, 64, 96; "), message
    assert "; ..." in message and "\n" not in message  # 6-8 nodes are cut short


@pytest.mark.parametrize("nodes, gpus, micro, batch, rampup, refused", [
    ((1, 2), 8, 2, 512, (32, 32, 2_000_000), None),
    ((1, 2), 8, 4, 512, (32, 32, 2_000_000), "2 nodes = 16 ranks need multiples of 64, not 32, 96, 160"),
    ((2, 3), 8, 1, 48, None, None),
    ((2, 3), 8, 1, 40, None, "3 nodes = 24 ranks need multiples of 24, not 40"),
    ((1, 1), 0, 3, 6, None, None),  # no GPUs: one process per node
    ((2, 2), 0, 3, 9, None, "2 nodes = 2 ranks need multiples of 6, not 9"),
    ((1, 1), 8, 1, 64, (16, 24, 10), None),  # stages 16, 40, 64 on 8 ranks
    ((2, 2), 8, 1, 64, (16, 24, 10), "2 nodes = 16 ranks need multiples of 16, not 40"),  # 16 and 64 would
    ((1, 1), 8, 1, 64, (64, 1, 10), None),  # start = globalBatchSize: no ramp at all
    ((1, 18), 0, 1, 12_252_240, None, None),  # lcm(1..18): the widest range any batch fits
    ((1, 19), 0, 1, 12_252_240, None, "19 nodes = 19 ranks need multiples of 19, not 12252240"),
    ((1, 64), 0, 1, 12_252_240, None, "19 nodes"),
    ((1, 65), 0, 1, 12_252_240, None, "nodes.min..nodes.max (1..65) spans 65 node counts, at most 64"),
])
def test_every_world_size_must_divide_every_stage_of_the_ramp(nodes, gpus, micro, batch, rampup, refused):
    document = sized(nodes, gpus, micro, batch, rampup)
    if refused is None:
        parse_manifest(document)
        return
    with pytest.raises(ManifestError) as err:
        parse_manifest(document)
    assert refused in str(err.value), str(err.value)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(low=st.integers(1, 6), span=st.integers(0, 3), gpus=st.sampled_from([0, 1, 2, 4, 8]),
       micro=st.integers(1, 4), start=st.integers(1, 64), increment=st.integers(1, 64), stages=st.integers(0, 5),
       ramp=st.booleans())
def test_the_rule_equals_walking_every_stage_at_every_size(low, span, gpus, micro, start, increment, stages, ramp):
    """The rule's shortcut (start, increment, globalBatchSize) against the brute force: each
    stage the ramp has, at each world size of the range."""
    batch = start + stages * increment if ramp else start * micro
    if batch % micro:
        return  # refused for its own reason (a batch of whole micro-batches)
    document = sized((low, low + span), gpus, micro, batch, (start, increment, 1000) if ramp else None)
    all_stages = range(start, batch + 1, increment) if ramp and start < batch else [batch]
    fits = all(stage % (micro * nodes * max(gpus, 1)) == 0
               for nodes in range(low, low + span + 1) for stage in all_stages)
    try:
        parse_manifest(document)
        accepted = True
    except ManifestError as err:
        assert "ranks need multiples of" in str(err), str(err)
        accepted = False
    assert accepted == fits


def test_the_cel_twin_is_a_bounded_loop_of_the_same_rule():
    from bloomrun.operator.crd import build_crd

    rules = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "x-kubernetes-validations"]
    rule = next(r for r in rules if "microBatchSize" in r["rule"] and "nodes.min + i" in r["rule"])
    assert "lists.range" not in rule["rule"] and rule["rule"].count("[0, 1, 2,") == 1
    assert "messageExpression" not in rule  # over the API server's cost budget (spec.py)
    assert math.lcm(*range(1, 19)) <= MAX_GLOBAL_BATCH < math.lcm(*range(1, 20))  # why 64 offsets lose nothing
    assert MAX_NODE_COUNTS == 64


def test_the_batch_is_split_over_data_parallel_ranks_of_whole_replicas():
    # tensor 2 x pipeline 2 on 4-GPU nodes: a replica per node, 1-3 nodes = 1-3 data-parallel ranks.
    model = {"preset": "tiny"}  # 4 heads, 2 layers: tensor 2 divides the heads, pipeline 2 the 2 + 2 slots
    document = sized((1, 3), 4, 2, 12, None)
    document["spec"].update(model=model, parallel={"tensor": 2, "pipeline": 2})
    parse_manifest(document)  # 12 = 2 x 6: whole micro-batches on 1, 2 and 3 data-parallel ranks
    document["spec"]["training"]["globalBatchSize"] = 8
    with pytest.raises(ManifestError) as err:
        parse_manifest(document)
    assert "3 nodes = 12 ranks (3 data-parallel) need multiples of 6, not 8" in str(err.value), str(err.value)
