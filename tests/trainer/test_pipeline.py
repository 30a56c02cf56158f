"""Pipeline parallelism (bloomrun/trainer/pipeline.py): the stage split, PipelineEngine
against the same model on one device (2 and 4 CPU ranks, gloo; P2 x DP2 under FSDP2), and
the real trainer with parallel.pipeline 2 against one rank, checkpoints resumed across
P=2 -> P=1 -> P=2, and P2 x DP2's dp-sharded checkpoint on P=1 and on P=2 (then back).

Tolerance: fp32, relative 1e-5 on losses and gradient norms. Splitting the model into
stages changes no arithmetic but the gradient norm's (a sum of per-stage squares) and the
data-parallel average's order; measured: losses equal to ~1e-7, norms to ~2e-7; P2 x DP2
under FSDP2 (its reduce-scatter, the norm's sum over dp shards): losses 8.3e-8, norms
6.5e-7 at gradClip 1.0 (no step clipped); 1.6e-7 and 5.9e-7 at 0.7 (18 of 20 clipped).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bloomrun.trainer.model import build_model
from bloomrun.trainer.pipeline import build_stage, stage_layers, stage_tensors
from tests.trainer import pipeline_workers, tp_workers
from tests.trainer.trainer_runs import (FP32_RTOL, Run, assert_close, checkpoint_steps, config,
                                        logged_grad_norms, losses)

VARIANTS = {
    "alibi-gelu": {"position": "alibi", "activation": "gelu"},
    "rotary-swiglu": {"position": "rotary", "activation": "swiglu", "embeddingLayernorm": False},
    "learned-gelu": {"position": "learned", "activation": "gelu"},
}


# ------------------------------------------------------------------ the stage split (pure)


@pytest.mark.parametrize("layers, stages, expected", [
    (4, 2, [range(0, 2), range(2, 4)]),  # 6 slots: embedding + 2 blocks | 2 blocks + head
    (4, 3, [range(0, 1), range(1, 3), range(3, 4)]),
    (70, 12, [range(0, 5)] + [range(5 + 6 * i, 11 + 6 * i) for i in range(10)] + [range(65, 70)]),  # 176b
])
def test_stages_take_blooms_layer_slots(layers, stages, expected):
    assert [stage_layers(layers, stages, s) for s in range(stages)] == expected


def test_a_stage_holds_its_own_parameters_under_the_models_names():
    cfg = pipeline_workers.pipeline_config({"position": "learned"}, 3)
    model = build_model(cfg.model, "cpu")
    full = dict(model.named_parameters())
    stages = [build_stage(model, s, 3) for s in range(3)]
    names = [set(n for n, _ in stage.named_parameters()) for stage in stages]
    embedding = {"word_embeddings.weight", "position_embeddings.weight", "word_embeddings_layernorm.weight",
                 "word_embeddings_layernorm.bias"}
    assert embedding <= names[0] and {n.split(".")[1] for n in names[0] if n.startswith("h.")} == {"0"}
    assert {n.split(".")[1] for n in names[1]} == {"1", "2"} and not names[1] - {n for n in full if n.startswith("h.")}
    assert names[2] == {n for n in full if n.startswith(("h.3.", "ln_f."))} | {"word_embeddings.weight"}
    assert set().union(*names) == set(full)
    # The model's own tensors, but the last stage's head: a copy of the embedding, equal to it.
    for stage in stages[:2]:
        assert all(p is full[n] for n, p in stage.named_parameters())
    head = dict(stages[2].named_parameters())["word_embeddings.weight"]
    assert head is not full["word_embeddings.weight"] and torch.equal(head, full["word_embeddings.weight"])
    assert stages[2].holds_head_copy() and not stages[0].holds_head_copy()


def test_a_stage_loads_its_share_of_a_whole_model_checkpoint():
    model_names = {"word_embeddings.weight", "h.0.w", "ln_f.weight"}
    tensors = {"word_embeddings.weight.exp_avg": 1, "h.0.w.exp_avg": 2, "ln_f.weight.exp_avg": 3}
    assert stage_tensors(tensors, {"ln_f.weight", "word_embeddings.weight"}, model_names) == \
        {"word_embeddings.weight.exp_avg": 1, "ln_f.weight.exp_avg": 3}
    with pytest.raises(ValueError, match=r"missing \['ln_f.weight'\], unexpected \['h.9.w'\]"):
        stage_tensors({"word_embeddings.weight": 1, "h.0.w": 2, "h.9.w": 3}, {"h.0.w"}, model_names)


# ------------------------------------------------------- PipelineEngine against one device


def assert_same_trajectory(result: dict) -> None:
    (ref_losses, ref_norms), got = result["reference"], result["pipeline"]
    assert len(ref_losses) == 20 and ref_losses[-1] < ref_losses[0] - 0.1
    assert got["losses"] == pytest.approx(ref_losses, rel=FP32_RTOL)
    assert got["norms"] == pytest.approx(ref_norms, rel=FP32_RTOL)
    assert got["heads_equal"]  # the tied embedding and the head's copy stayed equal


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pipeline_2_trains_like_one_device(tmp_path, variant):
    result = tp_workers.spawn(pipeline_workers.trajectories, 2, tmp_path / "out.json", VARIANTS[variant], 2, 20)
    assert_same_trajectory(result)
    assert sorted(set(result["names"][0]) & set(result["names"][1])) == ["word_embeddings.weight"]
    assert result["moments_held"] == [1.0, 1.0]  # one replica: nothing to shard, no FSDP2


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4: P2 x DP2 under FSDP2
def test_a_non_finite_loss_on_the_last_stage_skips_the_step_on_every_stage(tmp_path, world):
    verdicts = tp_workers.spawn(pipeline_workers.skips_together, world, tmp_path / "out.json")["verdicts"]
    assert [(v["first"], v["unchanged"], v["second"]) for v in verdicts] == [(False, True, True)] * world
    # A first stage saw a finite loss of its own (0: the loss is the last stage's) but the shared norm.
    assert [v["loss_finite"] for v in verdicts] == [True, False] * (world // 2)
    assert [v["sharded"] for v in verdicts] == [world > 2] * world


@pytest.mark.slow
def test_pipeline_3_with_a_middle_stage_trains_like_one_device(tmp_path):
    # The middle stage holds blocks only and takes no part in the tied weight's sum.
    result = tp_workers.spawn(pipeline_workers.trajectories, 3, tmp_path / "out.json", VARIANTS["alibi-gelu"], 3, 20)
    assert_same_trajectory(result)
    assert all(n.startswith("h.1.") or n.startswith("h.2.") for n in result["names"][1])


CLIPPING = 0.7


@pytest.mark.slow
@pytest.mark.parametrize("micro", [2, 4])  # 2 micro-batches per replica (1F1B), 1 (GPipe)
def test_pipeline_2_by_data_2_shards_with_fsdp2_and_trains_like_one_device(tmp_path, micro):
    # FSDP2's reduce-scatter averages over the replicas (a sum would double the norm), the
    # tied sum runs on dp shards (heads_equal compares them shard by shard), and the norm
    # sums the dp shards' squares (left out, it was each rank's half). gradClip 0.7 clips
    # (18 of 20 steps measured): this variant's norms run 0.645-0.777, at 1.0 none was.
    result = tp_workers.spawn(pipeline_workers.trajectories, 4, tmp_path / "out.json", VARIANTS["alibi-gelu"],
                              2, 20, micro, 1, CLIPPING)
    assert_same_trajectory(result)
    norms = result["reference"][1]
    assert min(norms) < CLIPPING < max(norms)
    assert result["names"][0] == result["names"][2] and result["names"][1] == result["names"][3]
    assert result["moments_held"] == [0.5] * 4  # every dimension 0 here is even: exactly half each


# --------------------------------------------------------------- the trainer, end to end

STEPS = 20


def pp_config(corpus, folder, pipeline: int, steps: int = STEPS, every: int = 10) -> dict:
    cfg = config(corpus, folder / "checkpoints", steps=steps, every=every, zero=0)
    cfg["parallel"] = {"pipeline": pipeline}
    return cfg


@pytest.mark.slow
def test_the_trainer_with_pipeline_2_trains_and_resumes_like_one_rank(corpus, tmp_path):
    one = Run(tmp_path / "p1", pp_config(corpus, tmp_path / "p1", 1), ranks=1).run()
    two = Run(tmp_path / "p2", pp_config(corpus, tmp_path / "p2", 2), ranks=2).run()
    reference = losses(one)
    assert sorted(reference) == list(range(1, STEPS + 1)) and reference[STEPS] < reference[1] - 0.3
    assert_close(losses(two), reference)
    assert logged_grad_norms(two) == pytest.approx(logged_grad_norms(one), rel=1e-3)  # as logged: 3 decimals
    assert "2 ranks (TP 1 x PP 2 x DP 1)" in two.output()
    # Both stages read the replica's samples.
    assert [r["indices"] for r in two.trace(0)] == [r["indices"] for r in two.trace(1)]
    written = two.folder / "checkpoints" / "step-00000010"
    meta = json.loads((written / "metadata.json").read_text())
    assert meta["layout"] == "sharded" and (meta["world_size"], meta["pipeline_parallel"]) == (2, 2)
    assert sorted(n for n in meta["files"] if n.startswith("shard-")) == ["shard-00000.safetensors",
                                                                          "shard-00001.safetensors"]
    # P2's step 10, resumed by one rank up to 15, then by P2 again up to 20.
    folder = tmp_path / "changes"
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copytree(written, folder / "checkpoints" / "step-00000010")
    middle = Run(folder / "p1", pp_config(corpus, folder, 1, steps=15, every=5), ranks=1).run()
    assert "resumed from" in middle.output() and checkpoint_steps(folder / "checkpoints")[-1] == 15
    last = Run(folder / "p2", pp_config(corpus, folder, 2, steps=STEPS, every=5), ranks=2).run()
    assert "resumed from" in last.output()
    resumed = {**losses(middle), **losses(last)}
    assert sorted(resumed) == list(range(11, STEPS + 1))
    assert_close(resumed, reference)


@pytest.mark.slow
def test_the_trainer_with_pipeline_2_by_data_2_resumes_on_other_layouts(corpus, tmp_path):
    # The manifest's zeroStage 0 still shards the replicas (FSDP2 at every stage, as the
    # tensor-parallel engine): the start line says ZeRO 1.
    one = Run(tmp_path / "p1", pp_config(corpus, tmp_path / "p1", 1), ranks=1).run()
    four = Run(tmp_path / "p2dp2", pp_config(corpus, tmp_path / "p2dp2", 2), ranks=4).run(timeout=400)
    reference = losses(one)
    assert_close(losses(four), reference)
    assert logged_grad_norms(four) == pytest.approx(logged_grad_norms(one), rel=1e-3)  # as logged: 3 decimals
    assert "4 ranks (TP 1 x PP 2 x DP 2)" in four.output() and "ZeRO 1;" in four.output()
    # A replica's two stages read its samples; the two replicas, different ones.
    indices = [[r["indices"] for r in four.trace(rank)] for rank in range(4)]
    assert indices[0] == indices[1] and indices[2] == indices[3] and indices[0] != indices[2]
    written = four.folder / "checkpoints" / "step-00000010"
    meta = json.loads((written / "metadata.json").read_text())
    assert meta["layout"] == "sharded" and (meta["world_size"], meta["pipeline_parallel"]) == (4, 2)
    # P2 x DP2's dp-sharded step 10, resumed by one rank up to 15; and by P2 without replicas
    # up to 15, whose checkpoint P2 x DP2 loads into its shards again up to 20.
    resumed = {}
    for name, chain in (("p1", [(1, 15)]), ("p2", [(2, 15), (4, STEPS)])):
        folder = tmp_path / f"from-10-{name}"
        (folder / "checkpoints").mkdir(parents=True)
        shutil.copytree(written, folder / "checkpoints" / "step-00000010")
        legs = [Run(folder / f"ranks{ranks}", pp_config(corpus, folder, 1 if ranks == 1 else 2, steps=steps, every=5),
                    ranks=ranks).run(timeout=400) for ranks, steps in chain]
        assert all("resumed from" in leg.output() for leg in legs)
        resumed[name] = {step: loss for leg in legs for step, loss in losses(leg).items()}
    assert sorted(resumed["p1"]) == list(range(11, 16)) and sorted(resumed["p2"]) == list(range(11, STEPS + 1))
    assert_close(resumed["p1"], reference)
    assert_close(resumed["p2"], reference)
