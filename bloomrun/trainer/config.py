"""The trainer's configuration: one pydantic section per concern.

This is the single source of truth for what a run is. The `BloomRun` manifest's `spec`
embeds these sections (the operator adds its cluster fields beside them), `bloomctl run`
reads the same manifest locally, and the trainer in a pod reads the resolved config the
operator writes into a ConfigMap. Manifest keys are camelCase, as Kubernetes objects are;
Python attributes are snake_case. Unknown keys and wrong types are rejected with the
field's path (see `format_validation_error`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

VOCAB_PAD_MULTIPLE = 128  # BLOOM pads the vocabulary so the embedding GEMMs tile evenly
SWIGLU_WIDTH_MULTIPLE = 64  # SwiGLU's inner width rounds to this for GEMM tiling


def mlp_width(hidden_size: int, activation: str) -> int:
    """Inner MLP width F.

    GELU: 4C, as BLOOM. SwiGLU has three C x F matrices instead of two, so F = 2/3 * 4C keeps
    the parameter count (and FLOPs) matched; rounded to a multiple of 64 for GEMM tiling.
    """
    if activation == "gelu":
        return 4 * hidden_size
    if activation == "swiglu":
        rounded = round(8 * hidden_size / 3 / SWIGLU_WIDTH_MULTIPLE) * SWIGLU_WIDTH_MULTIPLE
        return max(SWIGLU_WIDTH_MULTIPLE, rounded)
    raise ValueError(f"activation must be gelu or swiglu, got {activation!r}")


# Upper bounds where a value has a physical meaning, far above any real run (BLOOM: 366B tokens,
# batch 2048, ~100k steps) and below 2**53, the largest integer JSON carries exactly (the API
# server refuses a larger one as a float).
MAX_TOKENS = 10**15
MAX_STEPS = 10**9
MAX_GLOBAL_BATCH = 2**24


class Section(BaseModel):
    """Base for every config section: camelCase keys, no unknown keys, validated defaults."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
    )


# ---------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden_size: int
    num_heads: int
    seq_length: int
    vocab_size: int


# The BLOOM family, plus `tiny` for the CPU demo and `1b3`, the shape of the paper's
# ablation runs (tr3: 24 layers, hidden 2048, 16 heads, GPT-2's 50,257-token vocabulary).
PRESETS: dict[str, Shape] = {
    "tiny": Shape(num_layers=2, hidden_size=64, num_heads=4, seq_length=64, vocab_size=1024),
    "560m": Shape(num_layers=24, hidden_size=1024, num_heads=16, seq_length=2048, vocab_size=250880),
    "1b1": Shape(num_layers=24, hidden_size=1536, num_heads=16, seq_length=2048, vocab_size=250880),
    "1b3": Shape(num_layers=24, hidden_size=2048, num_heads=16, seq_length=2048, vocab_size=50257),
    "3b": Shape(num_layers=30, hidden_size=2560, num_heads=32, seq_length=2048, vocab_size=250880),
    "7b1": Shape(num_layers=30, hidden_size=4096, num_heads=32, seq_length=2048, vocab_size=250880),
    "176b": Shape(num_layers=70, hidden_size=14336, num_heads=112, seq_length=2048, vocab_size=250880),
}

PresetName = Literal["tiny", "560m", "1b1", "1b3", "3b", "7b1", "176b"]


class ModelConfig(Section):
    preset: PresetName | None = "tiny"
    """A named BLOOM shape; the shape fields below override single values of it."""
    num_layers: int | None = Field(default=None, ge=1, le=512)
    """Transformer blocks (overrides the preset)."""
    hidden_size: int | None = Field(default=None, ge=8, le=65536)
    """Model width (overrides the preset); must be divisible by numHeads."""
    num_heads: int | None = Field(default=None, ge=1, le=1024)
    """Attention heads (overrides the preset)."""
    seq_length: int | None = Field(default=None, ge=2, le=131072)
    """Training sequence length in tokens (overrides the preset)."""
    vocab_size: int | None = Field(default=None, ge=2, le=1_048_576)
    """Tokenizer vocabulary (overrides the preset); padded up to a multiple of 128."""
    position: Literal["alibi", "rotary", "learned", "none"] = "alibi"
    """Position information: the paper found ALiBi best and 'none' not that bad."""
    embedding_layernorm: bool = True
    """LayerNorm after the word embedding: stabilises training at a small zero-shot cost."""
    activation: Literal["gelu", "swiglu"] = "gelu"
    """MLP activation: SwiGLU was slightly better, BLOOM kept GELU for throughput."""
    layer_norm_epsilon: float = Field(default=1e-5, gt=0, lt=1)
    """LayerNorm epsilon."""
    init_std: float = Field(default=0.02, gt=0, lt=1)
    """Standard deviation of the normal weight initialisation."""
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """Fused Triton kernels or plain torch; auto means Triton on a CUDA device."""

    @model_validator(mode="after")
    def _check_shape(self) -> "ModelConfig":
        shape = self.shape()  # raises ValueError naming the missing field
        if shape.hidden_size % shape.num_heads:
            raise ValueError(
                f"hiddenSize ({shape.hidden_size}) must be divisible by numHeads ({shape.num_heads})"
            )
        if self.position == "rotary" and (shape.hidden_size // shape.num_heads) % 2:
            raise ValueError("position 'rotary' needs an even head dimension (hiddenSize / numHeads)")
        return self

    def shape(self) -> Shape:
        """The preset with this section's overrides applied."""
        base = PRESETS[self.preset] if self.preset else None
        values = {}
        for name in Shape.__dataclass_fields__:
            value = getattr(self, name)
            if value is None and base is not None:
                value = getattr(base, name)
            if value is None:
                raise ValueError(f"{to_camel(name)} is required when no preset is given")
            values[name] = value
        return Shape(**values)

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.shape().vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


# ----------------------------------------------------------------------------- data


class DataSource(Section):
    path: str = Field(min_length=1, max_length=4096)
    """Path prefix of a Megatron-DeepSpeed MMapIndexedDataset (PREFIX.bin and PREFIX.idx)."""
    weight: float = Field(default=1.0, gt=0, le=1e6)
    """Relative share of training samples drawn from this corpus."""
    name: str | None = Field(default=None, min_length=1, max_length=253)
    """Label for logs and metrics (defaults to the file name)."""


class DataConfig(Section):
    sources: list[DataSource] = Field(min_length=1, max_length=1024)
    """The corpora to blend, by weight (the paper's corpus ablations)."""
    tokenizer: str | None = Field(default=None, min_length=1, max_length=4096)
    """Hugging Face tokenizers JSON file the data was prepared with (checked against vocabSize)."""
    seed: int = Field(default=1234, ge=0, le=2**32 - 1)
    """Seed of the sample order; the same seed gives the same batches on any world size."""


# ------------------------------------------------------------------------- optimiser


class OptimConfig(Section):
    lr: float = Field(default=2e-4, gt=0, le=1)
    """Peak learning rate (the paper's ablations: 2e-4)."""
    min_lr: float = Field(default=1e-5, ge=0, le=1)
    """Learning rate at the end of the cosine decay."""
    warmup_tokens: int = Field(default=375_000_000, ge=0, le=MAX_TOKENS)
    """Linear warmup length in tokens (the paper: 375M)."""
    decay_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    """Cosine decay length in tokens; defaults to the whole run."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.999, ge=0, lt=1)
    eps: float = Field(default=1e-8, gt=0, le=1)
    weight_decay: float = Field(default=0.1, ge=0, le=10)
    grad_clip: float = Field(default=1.0, ge=0, le=1e6)
    """Global gradient-norm clip; 0 disables it."""

    @model_validator(mode="after")
    def _check_lr(self) -> "OptimConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"minLr ({self.min_lr}) must not exceed lr ({self.lr})")
        if (self.decay_tokens is not None and "warmup_tokens" in self.model_fields_set
                and self.decay_tokens < self.warmup_tokens):
            # Megatron's decay counts from token 0, warmup included (schedule.learning_rate).
            # As with the run's length (BloomRunSpec), only a warmup given is held against it.
            raise ValueError(f"decayTokens ({self.decay_tokens}) must not be shorter than "
                             f"warmupTokens ({self.warmup_tokens}): the decay counts from token 0")
        return self


# -------------------------------------------------------------------------- training


class RampUp(Section):
    start: int = Field(ge=1, le=MAX_GLOBAL_BATCH)
    """Global batch size (sequences) at the start of training (the paper: 32)."""
    increment: int = Field(ge=1, le=MAX_GLOBAL_BATCH)
    """Sequences added at each ramp stage."""
    samples: int = Field(ge=1, le=MAX_TOKENS)
    """Samples over which the batch grows to globalBatchSize (the paper: 2M)."""


class NanPolicy(Section):
    max_consecutive_bad_steps: int = Field(default=3, ge=1, le=1000)
    """Non-finite steps in a row (each skipped) before rolling back to the last good checkpoint."""
    skip_steps_after_rollback: int = Field(default=1, ge=0, le=1_000_000)
    """Batches skipped past the offending range after a rollback (BLOOM's manual remedy)."""


class TrainingConfig(Section):
    global_batch_size: int = Field(default=512, ge=1, le=MAX_GLOBAL_BATCH)
    """Sequences per optimiser step, across all data-parallel ranks."""
    micro_batch_size: int = Field(default=4, ge=1, le=65536)
    """Sequences per rank per forward pass; the rest is gradient accumulation."""
    rampup: RampUp | None = None
    """Batch-size ramp-up (optional)."""
    train_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    """Tokens to train on (the paper: 112B per corpus ablation); or give trainSteps."""
    train_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    """Optimiser steps to run; or give trainTokens."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto means bf16 on a GPU and fp32 on the CPU."""
    zero_stage: int = Field(default=1, ge=0, le=3)
    """DeepSpeed ZeRO stage 0-3."""
    seed: int = Field(default=1234, ge=0, le=2**32 - 1)
    """Seed of the weight initialisation."""
    nan_policy: NanPolicy = NanPolicy()
    """What to do about non-finite losses and gradients."""
    compile: bool = False
    """torch.compile the model (GPU runs)."""

    @model_validator(mode="after")
    def _check_length(self) -> "TrainingConfig":
        if (self.train_tokens is None) == (self.train_steps is None):
            raise ValueError("give exactly one of trainTokens and trainSteps")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"globalBatchSize ({self.global_batch_size}) must be a multiple of "
                f"microBatchSize ({self.micro_batch_size})"
            )
        if self.rampup and self.rampup.start > self.global_batch_size:
            raise ValueError("rampup.start must not exceed globalBatchSize")
        if self.rampup and (self.global_batch_size - self.rampup.start) % self.rampup.increment:
            # Megatron's ramp grows in whole increments and must land on the final batch.
            raise ValueError(
                f"rampup: globalBatchSize - start ({self.global_batch_size - self.rampup.start}) "
                f"must be a multiple of increment ({self.rampup.increment})"
            )
        return self


# -------------------------------------------------------------------------- parallel

TENSOR_DEGREES = (1, 2, 4, 8, 16)


def pipeline_stage_slots(num_layers: int, pipeline: int) -> int:
    """Layer slots per pipeline stage: BLOOM's rule (Megatron-DeepSpeed's partitioning with
    the embedding and the head in the pipeline): the embedding and the tied head each count
    as one layer, so layers + 2 must split evenly (176B: 70 + 2 = 72 over 12 stages)."""
    slots, rest = divmod(num_layers + 2, pipeline)
    if rest or slots < 1:
        raise ValueError(f"parallel.pipeline ({pipeline}) must divide model.numLayers + 2 ({num_layers} + 2): "
                         "the embedding and the head take one layer's slot each on the first and last stage")
    return slots


class ParallelConfig(Section):
    """Model parallelism; the data-parallel degree is what is left: world / (tensor x pipeline)."""

    tensor: int = Field(default=1, ge=1, le=16, json_schema_extra={"enum": list(TENSOR_DEGREES)})
    """Tensor-parallel ranks (1, 2, 4, 8 or 16), each holding numHeads / tensor whole heads and
    that share of the MLP and the vocabulary; one node's GPUs (BLOOM-176B: 4)."""
    pipeline: int = Field(default=1, ge=1, le=512)
    """Pipeline stages, by layer ranges; numLayers + 2 must be a multiple (BLOOM-176B: 12)."""

    @field_validator("tensor")
    @classmethod
    def _check_tensor(cls, tensor: int) -> int:
        # A power of two up to 16: it then divides the padded vocabulary (a multiple of 128) and
        # the SwiGLU width (a multiple of 64), so only the heads can be left over (checked with
        # the model in TrainerConfig).
        if tensor not in TENSOR_DEGREES:
            raise ValueError(f"must be one of {', '.join(map(str, TENSOR_DEGREES))}, not {tensor}")
        return tensor


def check_parallel(parallel: ParallelConfig, model: ModelConfig, zero_stage: int) -> None:
    """What a layout needs of the model and of ZeRO; ValueError naming the fields."""
    shape = model.shape()
    if shape.num_heads % parallel.tensor:
        raise ValueError(f"parallel.tensor ({parallel.tensor}) must divide model.numHeads ({shape.num_heads}) "
                         f"(and so hiddenSize, {shape.hidden_size}): each tensor rank computes whole heads")
    if parallel.pipeline > 1:
        pipeline_stage_slots(shape.num_layers, parallel.pipeline)
        if zero_stage > 1:
            # ZeRO-2 reduce-scatters the gradients after every micro-batch's backward and ZeRO-3
            # also gathers every stage's weights for each micro-batch, which the pipeline's
            # many small micro-batches multiply (DeepSpeed's PipelineEngine refuses both too);
            # BLOOM trained PP 12 with ZeRO-1.
            raise ValueError(f"training.zeroStage ({zero_stage}) does not compose with parallel.pipeline "
                             f"({parallel.pipeline}): use ZeRO 0 or 1 (stage 2 would reduce-scatter the "
                             "gradients after every micro-batch, stage 3 gather each stage's weights for every "
                             "micro-batch)")


class InitFrom(Section):
    """A warm start: the weights (and optionally AdamW's moments) of another run's checkpoint,
    loaded once, when this run has no checkpoint of its own. Step, data position and the
    learning-rate schedule start at 0; the source is recorded in every checkpoint after."""

    path: str | None = Field(default=None, min_length=1)
    """A checkpoint folder (step-N), or a folder of them (its newest complete one)."""
    run: str | None = Field(default=None, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    """Another run's name: its folder beside this run's (locally runs/NAME; on a cluster the
    run of that name in this namespace, on the same checkpoint volume)."""
    optimizer: bool = False
    """Also load AdamW's moments (a continuation rather than a fresh optimiser)."""

    @model_validator(mode="after")
    def _one_source(self) -> "InitFrom":
        if (self.path is None) == (self.run is None):
            raise ValueError("give exactly one of path and run")
        return self


class CheckpointConfig(Section):
    dir: str | None = None
    """Where checkpoints live: the launcher's choice (bloomrun.trainer.resolve), the run's volume
    in a pod, runs/NAME/checkpoints for bloomctl run; a BloomRun manifest may not set it."""
    every_steps: int | None = Field(default=1000, ge=1, le=MAX_STEPS)
    """Save every N optimiser steps (null: only by time)."""
    every_minutes: float | None = Field(default=None, gt=0, le=525_600)
    """Save every M minutes as well (BLOOM saved about every 3 hours)."""
    keep_last: int = Field(default=3, ge=1, le=10_000)
    """Complete checkpoints kept; older ones are deleted once a newer one is published."""
    init_from: InitFrom | None = None
    """Warm start from another run's checkpoint (a run never resumes another run's by itself)."""
    format: Literal["consolidated", "sharded"] = "consolidated"
    """consolidated: full tensors, gathered and written by rank 0. sharded: every rank writes its
    own shard (torch.distributed.checkpoint), so no rank holds the full state; for runs with
    parallel.tensor > 1. A parallel.tensor 1 run (DeepSpeed ZeRO, whose flat partitions DCP
    cannot describe) writes consolidated whatever this says (logged). Every run resumes either."""


class MetricsConfig(Section):
    port: int = Field(default=9400, ge=0, le=65535)
    """Prometheus port each node's rank-0-local process serves on (0 picks a free port)."""
    log_every: int = Field(default=1, ge=1, le=MAX_STEPS)
    """Steps between log lines."""


class WatchdogConfig(Section):
    """Hang detection (bloomrun/trainer/watchdog.py): a process beside each node's workers
    ends the worker group when a rank has made no progress for
    max(stepTimeFactor x the median step time, minTimeoutSeconds), or for phaseTimeoutSeconds
    in start-up or a checkpoint save or load (which beat only at their start and end)."""

    enabled: bool = True
    """Watch the ranks of a torchrun worker group (a process without torchrun is not watched)."""
    step_time_factor: float = Field(default=10.0, ge=2, le=10_000)
    """k: a rank is hung after k x the median step time without progress (at least the floor)."""
    min_timeout_seconds: float = Field(default=300.0, ge=1, le=86_400)
    """The floor of the step timeout, in seconds; NCCL's own collective timeout is 10 minutes."""
    phase_timeout_seconds: float = Field(default=1800.0, ge=1, le=7 * 86_400)
    """Start-up (data checks, model build, resume, the first step's compilation), a checkpoint
    save or load: seconds a rank may spend in one without a heartbeat."""

    @model_validator(mode="after")
    def _check_phase(self) -> "WatchdogConfig":
        if self.phase_timeout_seconds < self.min_timeout_seconds:
            raise ValueError(f"phaseTimeoutSeconds ({self.phase_timeout_seconds:g}) must not be shorter than "
                             f"minTimeoutSeconds ({self.min_timeout_seconds:g}): a checkpoint takes longer than a step")
        return self


# ------------------------------------------------------------------------ evaluation

# The paper's 27 zero-shot tasks under their lm-evaluation-harness 0.4 names (the paper's
# "lambada" is lambada_openai, its "sst" is sst2). tests/eval checks every name against the
# installed lm-eval.
EVAL_SUITES: dict[str, tuple[str, ...]] = {
    "bigscience-27": (
        "arc_challenge", "arc_easy", "boolq", "copa", "hellaswag", "lambada_openai", "logiqa",
        "mathqa", "mc_taco", "mrpc", "multirc", "openbookqa", "piqa", "prost", "pubmedqa", "qnli",
        "qqp", "race", "rte", "sciq", "sst2", "triviaqa", "webqs", "wic", "winogrande", "wnli", "wsc",
    ),
}
# bloomrun's own tasks, written from the example corpora's generator (bloomrun/eval/tasks.py).
BLOOMRUN_EVAL_TASKS = ("bloomrun_stories_order", "bloomrun_arithmetic", "bloomrun_stories_ppl")
EvalTaskName = Literal[EVAL_SUITES["bigscience-27"] + BLOOMRUN_EVAL_TASKS]  # type: ignore[valid-type]


class EvalConfig(Section):
    """Zero-shot evaluation of the run's checkpoints with lm-evaluation-harness (docs/eval.md)."""

    # A set on the API server too: it refuses a repeated name as a duplicate value.
    tasks: list[EvalTaskName] | None = Field(default=None, min_length=1, max_length=64,
                                             json_schema_extra={"x-kubernetes-list-type": "set"})
    """lm-eval task names to score each checkpoint on; or give suite."""
    suite: Literal["bigscience-27"] | None = None
    """A named task list: bigscience-27 is the paper's 27 tasks."""
    every_checkpoints: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    """Score every Nth checkpoint (default: every one); or give everyTokens."""
    every_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    """Score the first checkpoint at or past each multiple of N tokens (the paper: every
    1,500 steps, about 1.6B tokens), so arms are compared at equal tokens."""
    limit: int | None = Field(default=None, ge=1, le=10_000_000)
    """Documents scored per task (default: all of them); a quick look, not the paper's measure."""
    batch_size: int = Field(default=16, ge=1, le=4096)
    """Requests per forward pass."""
    task_data_dir: str | None = Field(default=None, min_length=1, max_length=4096)
    """Where the task data is staged: lm-eval task YAMLs anywhere below it (dataset_path: json
    over local files), and huggingface/, a Hugging Face cache holding the datasets of lm-eval's
    own tasks. Nothing is downloaded; bloomrun's own tasks need no data."""

    @model_validator(mode="after")
    def _check_choice(self) -> "EvalConfig":
        if (self.tasks is None) == (self.suite is None):
            raise ValueError("give exactly one of tasks and suite")
        if self.every_checkpoints is not None and self.every_tokens is not None:
            raise ValueError("give at most one of everyCheckpoints and everyTokens")
        if self.tasks and len(set(self.tasks)) != len(self.tasks):
            raise ValueError("tasks must not repeat a task")
        return self

    def task_names(self) -> list[str]:
        """The tasks to run: the suite's or the given list."""
        return list(EVAL_SUITES[self.suite]) if self.suite else list(self.tasks)


class TrainerConfig(Section):
    """Everything the trainer needs; the `spec` of a BloomRun minus the cluster's fields."""

    model: ModelConfig = ModelConfig()
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    training: TrainingConfig
    parallel: ParallelConfig = ParallelConfig()
    """Tensor and pipeline parallelism (data parallel takes the remaining ranks)."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    metrics: MetricsConfig = MetricsConfig()
    watchdog: WatchdogConfig = WatchdogConfig()
    """Hang detection of the worker group."""
    eval: EvalConfig | None = None
    """Zero-shot evaluation of the checkpoints (optional)."""

    @model_validator(mode="after")
    def _check_parallel(self) -> "TrainerConfig":
        check_parallel(self.parallel, self.model, self.training.zero_stage)
        return self


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, naming the manifest field: `spec.model.hiddenSize: ...`."""
    lines = []
    for problem in err.errors():
        path = ".".join(str(p) for p in problem["loc"])
        where = ".".join(p for p in (prefix, path) if p) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{where}: {message}")
    return "; ".join(lines)
