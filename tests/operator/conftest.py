"""Small BloomRun documents shared by the operator's unit tests."""

import copy

import pytest

from bloomrun.operator.desired import Run
from bloomrun.operator.spec import BloomRunSpec

TINY_SPEC = {
    "model": {"preset": "tiny"},
    "data": {"sources": [{"path": "examples/data/tiny"}]},
    # 48 sequences of 1 split over 1, 2 or 3 nodes of 8 GPUs (8, 16, 24 ranks): every world
    # size of the node ranges these tests use (a spec must divide over each, spec.py).
    "training": {"trainSteps": 20, "globalBatchSize": 48, "microBatchSize": 1},
    # Shared by the nodes of multi-node runs (spec.py refuses those without one).
    "checkpointVolume": {"claimName": "checkpoints"},
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
