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
    assert columns == ["Phase", "Nodes", "Step", "Loss", "Tokens/s", "Restarts", "Age"]
