"""Small BloomRun documents shared by the operator's unit tests."""

import copy

import pytest

from bloomrun.operator.desired import Run
from bloomrun.operator.spec import BloomRunSpec

TINY_SPEC = {
    "model": {"preset": "tiny"},
    "data": {"sources": [{"path": "examples/data/tiny"}]},
    "training": {"trainSteps": 20, "globalBatchSize": 8, "microBatchSize": 2},
}


def manifest(name="ablation", **spec_overrides):
    spec = copy.deepcopy(TINY_SPEC)
    spec.update(spec_overrides)
    return {"apiVersion": "bloomrun.io/v1alpha1", "kind": "BloomRun",
            "metadata": {"name": name, "namespace": "team-a"}, "spec": spec}


def make_run(generation=1, **spec_overrides) -> Run:
    spec = BloomRunSpec.model_validate(manifest(**spec_overrides)["spec"])
    return Run(name="ablation", namespace="team-a", uid="uid-1234", generation=generation, spec=spec)


@pytest.fixture
def run():
    return make_run(nodes={"min": 2, "max": 3}, gpusPerNode=8,
                    pool={"nodeSelector": {"bloomrun.io/pool": "a100-80gb"}})
