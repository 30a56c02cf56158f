"""The CRD is generated from spec.py; crds/ must match the generator (CI fails on drift)."""

from pathlib import Path

import yaml

from bloomrun.operator import crd

REPO = Path(__file__).resolve().parents[2]


def test_crds_folder_matches_the_models():
    committed = (REPO / "crds" / crd.CRD_FILE).read_text()
    assert committed == crd.render_crd(), "crds/ is stale: run `make crds` and commit the result"


def walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def test_schema_is_structural():
    schema = yaml.safe_load(crd.render_crd())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        if not isinstance(node, dict) or path.endswith(".properties"):
            continue
        assert "$ref" not in node and "title" not in node, path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("type") != "null", path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(bound, True), bool), path
        assert node.get("default", 0) is not None, path


def test_schema_carries_defaults_enums_bounds_and_cel_rules():
    version = yaml.safe_load(crd.render_crd())["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["model"]["properties"]["position"]["enum"] == ["alibi", "rotary", "learned", "none"]
    assert spec["gpusPerNode"]["maximum"] == 16 and spec["gpusPerNode"]["default"] == 8
    assert "self.min <= self.max" in str(spec["nodes"]["x-kubernetes-validations"])
    assert "% self.numHeads == 0" in str(spec["model"]["x-kubernetes-validations"])
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Nodes", "Layout", "Step", "Loss", "Tokens/s", "Restarts", "Goodput", "Eval", "Age"]
    # The layout only in `kubectl get br -o wide`: the default table stays as it was.
    assert [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0)] == ["Layout"]


def test_study_crd_matches_the_models_and_has_its_columns_and_rules():
    committed = (REPO / "crds" / crd.STUDY_CRD_FILE).read_text()
    assert committed == crd.render_study_crd(), "crds/ is stale: run `make crds` and commit the result"
    document = yaml.safe_load(committed)
    assert document["spec"]["names"]["shortNames"] == ["bs"] and document["spec"]["scope"] == "Namespaced"
    version = document["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Arms", "Done", "Best", "GPU-hours", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    arms = schema["properties"]["spec"]["properties"]["arms"]
    # The API server refuses too many arms and repeated arm names from these, as pydantic does.
    assert arms["maxItems"] == 16 and arms["minItems"] == 2
    assert arms["x-kubernetes-list-type"] == "map" and arms["x-kubernetes-list-map-keys"] == ["name"]
    assert f"a.name.size() <= {crd.MAX_RUN_NAME}" in str(schema["x-kubernetes-validations"])
    for path, node in walk(schema):
        if isinstance(node, dict) and not path.endswith(".properties"):
            assert "$ref" not in node and node.get("type") != "null", path
