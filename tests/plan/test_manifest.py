"""The chosen model's BloomRun manifest: `bloomctl validate` accepts it (the same
load_manifest), it carries the plan's shape and tokens, and a base manifest's fields survive."""

import textwrap

import pytest
import yaml

from bloomrun.operator.spec import load_manifest, load_manifest_text
from bloomrun.plan import manifest, rules
from bloomrun.plan.planner import Request, bloomrun_zero_stage, build_plan
from bloomrun.trainer.config import ModelConfig

BASE = textwrap.dedent("""\
    apiVersion: bloomrun.io/v1alpha1
    kind: BloomRun
    metadata:
      name: ablation-rotary
      namespace: research
      labels: {bloomrun.io/study: position}
    spec:
      model: {preset: 1b3, position: rotary, activation: swiglu, embeddingLayernorm: false}
      data:
        tokenizer: /data/tokenizer/gpt2.json
        sources: [{name: oscar, path: /data/oscar/oscar_text_document, weight: 1.0}]
      optim: {lr: 2.0e-4, minLr: 1.0e-5, warmupTokens: 375000000, beta2: 0.999}
      training:
        globalBatchSize: 512
        microBatchSize: 4
        rampup: {start: 128, increment: 128, samples: 2000000}
        trainTokens: 112000000000
        zeroStage: 1
      nodes: {min: 4, max: 4}
      gpusPerNode: 8
      checkpointVolume: {claimName: ablations, mountPath: /checkpoints}
      dataVolume: {claimName: corpora, mountPath: /data}
      budget: {gpuHours: 2000}
    """)


def plan_for(**overrides):
    fields = dict(gpu_hours=1_161_216, gpu="a100-80gb", tflops=150.0, cluster=rules.Cluster(num_gpus=384),
                  shapes=((70, 14336, 112),))
    return build_plan(Request(**{**fields, **overrides}))


def test_written_manifest_validates_and_carries_the_plan(tmp_path):
    plan = plan_for()
    document = manifest.build_manifest(plan, "bloom-final")
    path = tmp_path / "bloom-final.yaml"
    path.write_text(manifest.manifest_yaml(plan, document))
    run = load_manifest(path)  # what bloomctl validate runs
    spec = run.spec
    shape = spec.model.shape()
    assert (shape.num_layers, shape.hidden_size, shape.num_heads, shape.seq_length, shape.vocab_size) == \
        (70, 14336, 112, 2048, 250880)
    assert spec.model.preset is None and spec.model.position == "alibi" and spec.model.activation == "gelu"
    assert spec.training.train_tokens == plan.chosen.tokens
    assert (spec.nodes.min, spec.nodes.max, spec.gpus_per_node) == (48, 48, 8)
    layout = plan.chosen.layout  # the plan's 3-D layout, checked by the API server's rules
    assert (spec.parallel.tensor, spec.parallel.pipeline) == (layout.tp, layout.pp)
    assert spec.training.global_batch_size == 2048 and spec.training.micro_batch_size == layout.micro_batch
    assert spec.training.zero_stage == 1 and spec.training.precision == "bf16"
    assert spec.budget.gpu_hours == 1_161_216
    assert spec.optim.lr == 6e-5 and spec.optim.beta2 == 0.95  # BLOOM-176B's recipe
    assert spec.pool.node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert str(layout) in run.metadata.annotations["bloomrun.io/plan"]
    text = path.read_text()
    assert "#   budget C = 1,161,216 GPU-hours x 3600 s x 150 TFLOP/s" in text
    # The layout as the trainer runs it: no recompute, a pipeline's replicas sharded by FSDP2
    # with whole fp32 weights and gradients during a step (8 + 12/16 bytes a parameter): more
    # than the plan's estimate under ZeRO 1 (4 + 12/16), less than whole states (16).
    today = plan.chosen.bloomrun_memory
    params = today.params_per_gpu
    assert today.states_bytes == pytest.approx(params * (8 + 12 / 16)) and not today.fits
    assert plan.chosen.memory.states_bytes == pytest.approx(params * (4 + 12 / 16))
    assert "its pipelines' replicas with whole weights and gradients in a step" in text
    assert f"= {today.total_gib:,.1f} GiB per GPU of 80: it does NOT fit." in text
    assert f"{manifest.PLACEHOLDER_DATA} is a placeholder" in text
    # 48 nodes share their checkpoints through a claim, named here for the cluster to replace.
    assert spec.checkpoint_volume.claim_name == manifest.PLACEHOLDER_CHECKPOINT_CLAIM
    assert f"checkpointVolume.claimName ({manifest.PLACEHOLDER_CHECKPOINT_CLAIM}) is a placeholder" in text


def test_a_base_manifest_keeps_its_data_optimiser_and_cluster_fields(tmp_path):
    base_path = tmp_path / "base.yaml"
    base_path.write_text(BASE)
    base_model = load_manifest(base_path).spec.model
    plan = plan_for(model=base_model, shapes=((24, 2048, 16),), gpu_hours=2000, cluster=rules.Cluster(num_gpus=64))
    document = manifest.build_manifest(plan, "final-1b3", yaml.safe_load(BASE))
    run = load_manifest_text(manifest.manifest_yaml(plan, document, str(base_path)), "planned")
    spec = run.spec
    assert run.metadata.namespace == "research" and run.metadata.labels == {"bloomrun.io/study": "position"}
    assert spec.model.position == "rotary" and spec.model.activation == "swiglu" and not spec.model.embedding_layernorm
    assert spec.model.shape().vocab_size == 50257 and spec.model.shape().num_layers == 24
    assert spec.data.tokenizer == "/data/tokenizer/gpt2.json" and spec.data.sources[0].name == "oscar"
    assert spec.optim.lr == 2e-4 and spec.optim.beta2 == 0.999
    assert spec.checkpoint_volume.claim_name == "ablations" and spec.data_volume.claim_name == "corpora"
    assert spec.training.rampup is None  # a ramp derived for 512 sequences on 4 nodes would not hold
    assert (spec.nodes.min, spec.nodes.max) == (8, 8) and spec.training.global_batch_size == 2048
    assert spec.training.train_tokens == plan.chosen.tokens
    assert spec.budget.gpu_hours == 2000


def test_bloom_own_layout_validates_as_a_manifest():
    plan = plan_for(tp=4, pp=12, micro_batch=2)
    run = load_manifest_text(manifest.manifest_yaml(plan, manifest.build_manifest(plan, "bloom")), "bloom")
    assert (run.spec.parallel.tensor, run.spec.parallel.pipeline, run.spec.training.micro_batch_size) == (4, 12, 2)
    assert (run.spec.nodes.min, run.spec.gpus_per_node, run.spec.training.global_batch_size) == (48, 8, 2048)


def test_gpus_must_make_whole_nodes():
    plan = plan_for(cluster=rules.Cluster(num_gpus=12, gpus_per_node=8, global_batch=1536), gpu_hours=1000,
                    model=ModelConfig(preset="1b3"), shapes=((22, 2048, 16),))
    with pytest.raises(ValueError, match=r"gpus \(12\) must be a whole number of nodes of 8"):
        manifest.build_manifest(plan, "x")


def test_bloomrun_runs_a_pipelines_replicas_on_fsdp2_at_zero_1s_stage():
    # docs/plan.md's figure: BLOOM-176B's budget with the paper's data minimum chooses 49 x 10240
    # in TP8 PP3 DP16; whole optimizer states on each replica needed 42.3 + 46.3 = 88.6 GiB of 80.
    plan = plan_for(shapes=(), min_tokens=350 * 10**9)
    today = plan.chosen.bloomrun_memory
    assert (plan.chosen.label, str(plan.chosen.layout)) == ("49x10240x80", "TP8 PP3 DP16 mb2")
    assert (round(today.states_bytes / 2**30, 1), round(today.activations_bytes / 2**30, 1)) == (23.1, 46.3)
    assert round(today.total_gib, 1) == 69.4 and today.fits
    request = plan.request
    assert [bloomrun_zero_stage(request, rules.Layout(tp=8, pp=pp, dp=dp, micro_batch=2))
            for pp, dp in ((3, 16), (3, 1), (1, 16))] == [1, 0, request.cluster.zero_stage]
