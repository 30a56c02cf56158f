"""The BloomRun spec: one source of truth with the trainer, one-line errors naming fields."""

import pytest

from bloomrun.operator.spec import BloomRunSpec, ManifestError, load_manifest, parse_manifest
from bloomrun.trainer.config import CheckpointConfig, TrainerConfig

from .conftest import manifest


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
                                              "(training.trainSteps x globalBatchSize x model.seqLength: 20 x 8 x 64)"),
    (manifest(training={"trainTokens": 1000}, optim={"warmupTokens": 2000}),
     "spec: optim.warmupTokens (2000) is longer than the run (training.trainTokens: 1000)"),
    (manifest(optim={"warmupTokens": 100, "decayTokens": 50}),
     "spec.optim: decayTokens (50) must not be shorter than warmupTokens (100)"),
    (manifest(training={"trainSteps": 2, "globalBatchSize": 8, "microBatchSize": 2,
                        "rampup": {"start": 2, "increment": 2, "samples": 100}}),
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
    manifest(optim={"warmupTokens": 20 * 8 * 64}),  # exactly the run
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
