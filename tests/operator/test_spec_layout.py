"""spec.parallel placed on nodes: tensor groups inside a node, whole pipeline replicas per node range."""

import pytest

from bloomrun.operator.spec import ManifestError, layout_refusal, parse_manifest

from .conftest import manifest


def test_bloom_176b_layout_fits_48_nodes_of_8():
    # TP 4 x PP 12 = 48 ranks = 6 nodes per replica; 48 nodes = DP 8 (../shared/PAPER.md).
    assert layout_refusal(4, 12, 8, 48, 48) is None
    assert layout_refusal(4, 12, 8, 6, 48) is None


def test_a_tensor_group_stays_on_one_node():
    assert "parallel.tensor (8) must not exceed gpusPerNode (4)" in layout_refusal(8, 1, 4, 1, 1)
    assert "parallel.tensor (4) must not exceed gpusPerNode (6) and must divide it" in layout_refusal(4, 1, 6, 1, 1)
    assert "gpusPerNode (0)" in layout_refusal(2, 1, 0, 1, 1)  # CPU workers: one process per node
    assert layout_refusal(8, 1, 8, 1, 3) is None


def test_node_ranges_keep_whole_pipeline_replicas():
    # 2 x 4 = 8 ranks on 4 GPUs per node: a replica takes 2 nodes, so both ends must be even.
    message = layout_refusal(2, 4, 4, 3, 4)
    assert "nodes.min (3) and nodes.max (4) must be multiples of 2" in message
    assert "nodes.min (2) and nodes.max (5)" in layout_refusal(2, 4, 4, 2, 5)
    assert layout_refusal(2, 4, 4, 2, 6) is None
    assert "must divide gpusPerNode (8)" in layout_refusal(1, 3, 8, 1, 1)  # 3-stage pipelines do not tile 8 GPUs
    assert "must be a multiple of gpusPerNode (8)" in layout_refusal(4, 3, 8, 3, 3)  # 12 ranks: 1.5 nodes
    assert layout_refusal(2, 2, 8, 1, 2) is None  # two replicas per node


def test_the_spec_refuses_a_bad_layout_naming_the_fields():
    with pytest.raises(ManifestError, match=r"parallel.tensor \(2\) must not exceed gpusPerNode \(1\)"):
        parse_manifest(manifest(gpusPerNode=1, parallel={"tensor": 2}))
    with pytest.raises(ManifestError, match=r"parallel.tensor \(8\) must divide model.numHeads \(4\)"):
        parse_manifest(manifest(gpusPerNode=8, parallel={"tensor": 8}))
    run = parse_manifest(manifest(gpusPerNode=8, parallel={"tensor": 2, "pipeline": 2}))
    assert (run.spec.parallel.tensor, run.spec.parallel.pipeline) == (2, 2)
    assert run.spec.trainer_config().parallel == run.spec.parallel
