"""parallel: {tensor, pipeline}: the layouts the config refuses, each naming its field."""

import pytest
from pydantic import ValidationError

from bloomrun.trainer.config import TrainerConfig, pipeline_stage_slots


def config(parallel=None, model=None, **training):
    return TrainerConfig.model_validate({
        "model": model or {"preset": "tiny"},
        "data": {"sources": [{"path": "x"}]},
        "training": {"globalBatchSize": 8, "microBatchSize": 2, "trainSteps": 10, **training},
        **({"parallel": parallel} if parallel is not None else {}),
    })


def refusal(**kwargs) -> str:
    with pytest.raises(ValidationError) as err:
        config(**kwargs)
    return str(err.value)


def test_the_default_is_one_tensor_rank_and_one_stage():
    parallel = config().parallel
    assert (parallel.tensor, parallel.pipeline) == (1, 1)


def test_the_paper_layouts_validate():
    assert config({"tensor": 4, "pipeline": 12}, {"preset": "176b"}).parallel.tensor == 4  # BLOOM-176B
    assert config({"tensor": 4, "pipeline": 2}, {"preset": "1b3"}, zeroStage=1).parallel.pipeline == 2  # tr3: 24 + 2 = 26
    assert config({"tensor": 2}, {"preset": "tiny", "numHeads": 2, "hiddenSize": 64}).parallel.tensor == 2


@pytest.mark.parametrize("tensor", [3, 5, 12])
def test_tensor_must_be_a_power_of_two_up_to_16(tensor):
    message = refusal(parallel={"tensor": tensor})
    assert "parallel.tensor" in message and f"must be one of 1, 2, 4, 8, 16, not {tensor}" in message


def test_tensor_must_divide_the_heads():
    message = refusal(parallel={"tensor": 8}, model={"preset": "tiny"})  # 4 heads
    assert "parallel.tensor (8) must divide model.numHeads (4)" in message
    message = refusal(parallel={"tensor": 4}, model={"preset": "tiny", "numHeads": 2, "hiddenSize": 64})
    assert "model.numHeads (2)" in message and "hiddenSize" in message
    assert config({"tensor": 4}, {"preset": "tiny", "numHeads": 12, "hiddenSize": 96}).parallel.tensor == 4


def test_pipeline_must_divide_layers_plus_the_embedding_and_head_slots():
    assert pipeline_stage_slots(70, 12) == 6 and pipeline_stage_slots(2, 4) == 1
    with pytest.raises(ValueError, match=r"parallel.pipeline \(5\) must divide model.numLayers \+ 2 \(70 \+ 2\)"):
        pipeline_stage_slots(70, 5)
    assert "parallel.pipeline (3) must divide model.numLayers + 2 (2 + 2)" in refusal(parallel={"pipeline": 3})
    assert "parallel.pipeline (8)" in refusal(parallel={"pipeline": 8})  # more stages than slots


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_do_not_compose_with_a_pipeline(stage):
    message = refusal(parallel={"pipeline": 2}, zeroStage=stage)
    assert f"training.zeroStage ({stage}) does not compose with parallel.pipeline (2)" in message
    assert "every micro-batch" in message
    assert config({"pipeline": 2}, zeroStage=1).parallel.pipeline == 2
    assert config({"tensor": 2}, zeroStage=stage).training.zero_stage == stage  # tensor alone composes
