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
    ({"imagePullPolicy": "Always"}, "spec.imagePullPolicy: unknown field"),
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
