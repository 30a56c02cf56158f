"""The BloomRun manifest for the plan's chosen model: a pure builder (a dict and its YAML text).

The manifest carries the plan's 3-D layout as `spec.parallel` (tensor, pipeline; data
parallelism takes the rest), its micro-batch and global batch, so `bloomctl validate` checks
the layout with the API server's rules. bloomrun's trainer runs that layout (tensor and
pipeline parallelism) but does not recompute activations, and its pipelines' replicas hold
whole fp32 weights and gradients during a step (FSDP2 shards them between steps, and the
optimizer's moments always: pipeline.py); the header says so, with the memory per GPU of the
layout as it runs it, so nobody mistakes the plan's estimate (with recompute, ZeRO) for the
trainer's.

With a base manifest (a study's winning arm, say) its data, optimiser, checkpointing and
cluster fields are kept and only the model's shape, the layout, the run's length and the
GPUs change; without one, BLOOM-176B's recipe (../shared/PAPER.md) and a data path to replace.
"""

from __future__ import annotations

import copy

import yaml

from bloomrun.plan import memory
from bloomrun.plan.planner import Candidate, Plan

API_VERSION = "bloomrun.io/v1alpha1"
PLACEHOLDER_DATA = "/data/corpus/corpus_text_document"
# The nodes of a multi-node run share their checkpoints through a claim (a BloomRun without
# one is refused: bloomrun.operator.spec); a name to replace with the cluster's own.
PLACEHOLDER_CHECKPOINT_CLAIM = "checkpoints"

# GPU feature discovery's nvidia.com/gpu.product label of each GPU type.
GPU_PRODUCT_LABEL = {
    "a100-40gb": "NVIDIA-A100-SXM4-40GB",
    "a100-80gb": "NVIDIA-A100-SXM4-80GB",
    "h100-80gb": "NVIDIA-H100-80GB-HBM3",
    "h200": "NVIDIA-H200",
}

# BLOOM-176B's optimiser: AdamW (0.9, 0.95), lr 6e-5 with cosine decay to 6e-6, 375M tokens
# of warmup; weight decay 0.1 and clipping 1.0 as in the ablations.
BLOOM_OPTIM = {"lr": 6.0e-5, "minLr": 6.0e-6, "warmupTokens": 375_000_000, "beta1": 0.9, "beta2": 0.95,
               "weightDecay": 0.1, "gradClip": 1.0}


def build_manifest(plan: Plan, name: str, base: dict | None = None) -> dict:
    """The BloomRun object (a dict) that trains `plan.chosen`; `base` is a manifest's dict."""
    chosen = plan.chosen
    if chosen is None:
        raise ValueError("the plan has no chosen model to write a manifest for")
    request, cluster = plan.request, plan.request.cluster
    if cluster.num_gpus % cluster.gpus_per_node:
        raise ValueError(f"gpus ({cluster.num_gpus}) must be a whole number of nodes of {cluster.gpus_per_node}")
    nodes = cluster.num_gpus // cluster.gpus_per_node
    shape = chosen.shape
    model = request.model
    manifest = copy.deepcopy(base) if base else {
        "apiVersion": API_VERSION, "kind": "BloomRun", "metadata": {},
        "spec": {"data": {"sources": [{"name": "corpus", "path": PLACEHOLDER_DATA, "weight": 1.0}]},
                 "optim": dict(BLOOM_OPTIM),
                 "checkpoint": {"everyMinutes": 180, "keepLast": 3},  # BLOOM saved about every 3 hours
                 "pool": {"nodeSelector": {"nvidia.com/gpu.product": GPU_PRODUCT_LABEL[request.gpu]}}},
    }
    metadata = manifest.setdefault("metadata", {})
    metadata["name"] = name
    metadata.setdefault("annotations", {})["bloomrun.io/plan"] = describe(plan, chosen)
    spec = manifest.setdefault("spec", {})
    spec["model"] = {
        "preset": None, "numLayers": shape.num_layers, "hiddenSize": shape.hidden_size,
        "numHeads": shape.num_heads, "seqLength": shape.seq_length, "vocabSize": shape.vocab_size,
        "position": model.position, "embeddingLayernorm": model.embedding_layernorm,
        "activation": model.activation,
    }
    training = spec.setdefault("training", {})
    training.update({"globalBatchSize": cluster.global_batch, "microBatchSize": chosen.layout.micro_batch,
                     "trainTokens": chosen.tokens, "precision": "bf16", "zeroStage": cluster.zero_stage})
    spec["parallel"] = {"tensor": chosen.layout.tp, "pipeline": chosen.layout.pp}
    for stale in ("trainSteps", "rampup"):  # the length is trainTokens; a ramp would need re-deriving
        training.pop(stale, None)
    spec["nodes"] = {"min": nodes, "max": nodes}
    if nodes > 1 and not spec.get("checkpointVolume", {}).get("claimName"):
        spec["checkpointVolume"] = {**spec.get("checkpointVolume", {}), "claimName": PLACEHOLDER_CHECKPOINT_CLAIM}
    spec["gpusPerNode"] = cluster.gpus_per_node
    spec["budget"] = {"gpuHours": round(request.gpu_hours, 3)}
    return manifest


def describe(plan: Plan, chosen: Candidate) -> str:
    """One line for the annotation: shape, size, tokens, cost and the 3-D layout."""
    layout = (f"BLOOM-style layout {chosen.layout} ({chosen.memory.total_gib:.1f} GiB/GPU)" if chosen.layout
              else "no BLOOM-style layout fits")
    return (f"{chosen.shape.num_layers}x{chosen.shape.hidden_size}x{chosen.shape.num_heads}, {chosen.params:,} params, "
            f"{chosen.tokens:,} tokens, {chosen.gpu_hours:,.0f} GPU-hours at {plan.request.tflops:g} TFLOP/s "
            f"({plan.request.gpu}), {chosen.days:.1f} days on {plan.request.cluster.num_gpus} GPUs; {layout}")


def manifest_yaml(plan: Plan, manifest: dict, base_path: str | None = None) -> str:
    """The manifest as YAML under a header that says where it came from and what to check."""
    chosen, request = plan.chosen, plan.request
    header = [f"# Written by bloomctl plan: {describe(plan, chosen)}.", "#"]
    header += [f"#   {line}" for line in plan.arithmetic]
    today = chosen.bloomrun_memory
    header += [
        "#",
        f"# spec.parallel is the layout above (tensor {chosen.layout.tp}, pipeline {chosen.layout.pp}; data parallel "
        f"{chosen.layout.dp}). bloomrun's trainer runs it",
        "# without activation recompute" + (", its pipelines' replicas with whole weights and gradients in a step"
                                            if chosen.layout.pp > 1 else "") + ": estimated at model states "
        f"{today.states_bytes / memory.GIB:,.1f} GiB",
        f"# + activations {today.activations_bytes / memory.GIB:,.1f} GiB = {today.total_gib:,.1f} GiB per GPU of "
        f"{today.capacity_gib:g}: " + ("it fits." if today.fits else
                                       "it does NOT fit."),
    ]
    if base_path:
        header.append(f"# Data, optimiser, checkpointing and cluster fields from {base_path}.")
    else:
        header.append(f"# Replace spec.data ({PLACEHOLDER_DATA} is a placeholder) and add the volumes and image "
                      "your cluster needs.")
    if manifest["spec"].get("checkpointVolume", {}).get("claimName") == PLACEHOLDER_CHECKPOINT_CLAIM:
        header.append(f"# checkpointVolume.claimName ({PLACEHOLDER_CHECKPOINT_CLAIM}) is a placeholder: a "
                      "ReadWriteMany claim the nodes share.")
    return "\n".join(header) + "\n" + yaml.safe_dump(manifest, sort_keys=False)
