"""The BloomStudy resource: the paper's ablation study as one object.

A study is a base run (a full BloomRun spec) and arms, each a name and a partial spec merged
onto the base (`model: {position: rotary}`), trained to the same tokens (`compareAtTokens`)
under one GPU-hour budget and compared by loss and zero-shot accuracy (`eval`). What each
arm runs is a pure function of the study: `arm_specs(spec)` gives each arm's BloomRunSpec,
the same for `bloomctl study run` (bloomrun/study/local.py) and for the operator, which
creates one BloomRun per arm from `arm_manifest(study, arm)`.

The rules, each refused with the field named (`check_study`):
- a patch is a JSON merge patch (RFC 7386): mappings merge key by key, anything else
  (lists included) replaces, null deletes the key; the merged spec must be a valid BloomRun
  spec, checked as strictly as the API server checks a BloomRun;
- the comparison is at equal tokens: every arm trains to `compareAtTokens` on the learning-
  rate schedule of its own run length (base or patch `training.trainTokens/trainSteps`,
  which must reach compareAtTokens), so an arm compared early is the same run stopped early;
- the evaluation (`spec.eval`) and the budget (`spec.budget`) are the study's: a base or a
  patch that sets its own is refused;
- two arms equal after merging are refused, and so is an arm that changes the comparison's
  basis (tokenizer, vocabulary, sequence length, data order or initialisation seed; see
  BASIS) unless it says so with `changesBasis: true`;
- the budget must cover every arm's estimate: the paper's arithmetic (8 x parameters x
  tokens / achieved FLOP/s per GPU, bloomrun.plan.arithmetic) on the arm's shape to
  compareAtTokens, at the achieved TFLOP/s of `budget.gpu` (or `budget.achievedTflops`).
  Each arm's BloomRun gets the budget's share in proportion to its estimate.

Torch-free and kopf-free, like bloomrun.operator.spec, which it builds on.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from bloomrun.operator.spec import (
    API_VERSION,
    MAX_RUN_NAME,
    RUN_NAME_PATTERN,
    BloomRunSpec,
    Condition,
    ManifestError,
    ObjectMeta,
    Status,
    as_sent,
    prune_nulls,
    read_document,
    read_manifest_file,
)
from bloomrun.plan.arithmetic import ACHIEVED_TFLOPS, count_parameters, gpu_hours, gpu_tflops
from bloomrun.trainer.config import MAX_TOKENS, EvalConfig, Section, TrainingConfig, format_validation_error
from bloomrun.trainer.schedule import run_length

KIND = "BloomStudy"
PLURAL = "bloomstudies"
SHORT_NAME = "bs"
MAX_ARMS = 16
# An arm runs as the BloomRun `<study>-<arm>`, which must itself be a valid run name.
MAX_ARM_NAME = MAX_RUN_NAME - 2
STUDY_LABEL = "bloomrun.io/study"
ARM_LABEL = "bloomrun.io/arm"
DEFAULT_GPU = "a100-80gb"

GpuType = Literal[tuple(ACHIEVED_TFLOPS)]  # type: ignore[valid-type]


class StudyError(ManifestError):
    """A study that cannot run as written; the message is one line naming the field."""


# ----------------------------------------------------------------------------- spec


class Arm(Section):
    """One arm of the study: the base run with one change."""

    name: str = Field(min_length=1, max_length=MAX_ARM_NAME, pattern=RUN_NAME_PATTERN)
    """The arm's name (a DNS label); its BloomRun is named `<study>-<arm>`."""
    patch: dict[str, Any] = Field(default={}, json_schema_extra={
        "type": "object", "x-kubernetes-preserve-unknown-fields": True})
    """A partial BloomRun spec merged onto spec.base (JSON merge patch: mappings merge, lists
    replace, null deletes), e.g. {model: {position: rotary}}."""
    changes_basis: bool = False
    """The arm changes what the comparison rests on (tokenizer, vocabulary, sequence length,
    data order or initialisation seed) on purpose; without it such an arm is refused."""


class StudyBudget(Section):
    gpu_hours: float = Field(gt=0, le=1e9)
    """GPU-hours for the whole study; it must cover every arm's estimated cost to compareAtTokens."""
    gpu: GpuType = DEFAULT_GPU
    """GPU type the arms run on: its achieved TFLOP/s (bloomrun.plan's table) prices the estimate."""
    achieved_tflops: float | None = Field(default=None, gt=0, le=100_000)
    """Achieved TFLOP/s per GPU measured on your own cluster, instead of the table's figure for gpu."""


class BloomStudySpec(Section):
    """An ablation study: arms of one base run, trained to equal tokens under one budget."""

    base: BloomRunSpec
    """The run every arm starts from: a full BloomRun spec."""
    arms: list[Arm] = Field(min_length=2, max_length=MAX_ARMS, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})
    """The arms, each the base with one patch; arms are compared with each other, not with the base."""
    compare_at_tokens: int = Field(ge=1, le=MAX_TOKENS)
    """The comparison point in tokens: every arm trains to it (ends at the first step reaching it)."""
    budget: StudyBudget
    """GPU-hours for the whole study and the GPU type they are estimated on."""
    max_concurrent: int = Field(default=1, ge=1, le=MAX_ARMS)
    """Arms training at once on a cluster (bloomctl study run trains one after another)."""
    eval: EvalConfig
    """The evaluation suite every arm is scored on (the comparison's measure)."""
    suspend: bool = False
    """Suspend every arm's run (checkpoints stay); false again resumes them."""

    @field_validator("arms")
    @classmethod
    def _unique_names(cls, arms: list[Arm]) -> list[Arm]:
        seen: dict[str, int] = {}
        for index, arm in enumerate(arms):
            if arm.name in seen:
                raise ValueError(f"arms[{index}].name {arm.name!r} repeats arms[{seen[arm.name]}].name")
            seen[arm.name] = index
        return arms


# ----------------------------------------------------------------------------- status


ArmPhase = Literal["Pending", "Running", "Stopped", "Trained", "Succeeded", "Failed"]


class ArmStatus(Status):
    """One arm's row of the study's table."""

    name: str
    run: str | None = None
    """The arm's BloomRun (on a cluster) or run folder (locally)."""
    phase: ArmPhase = "Pending"
    """Pending, Running, Stopped (interrupted, resumable), Trained (at the comparison point,
    not yet scored there), Succeeded (trained and scored), Failed."""
    tokens: int | None = None
    """Tokens trained (newest checkpoint)."""
    gpu_hours: float | None = None
    """GPU-hours: measured on a cluster; locally the paper's estimate for the tokens trained."""
    estimated_gpu_hours: float | None = None
    """The arm's estimated cost to the comparison point (the budget check's figure)."""
    loss: float | None = None
    """Training loss at the comparison point (the final checkpoint's)."""
    eval_step: int | None = None
    eval_tokens: int | None = None
    """The checkpoint the evaluation columns score (the comparison point once trained)."""
    mean: float | None = None
    """Mean zero-shot accuracy over the suite's tasks."""
    normalised_mean: float | None = None
    """Mean of (accuracy - random) / (1 - random)."""
    stderr: float | None = None
    """Standard error of `mean` (bloomrun.eval.runner.mean_stderr over the tasks' lm-eval
    stderrs): locally from the results file, on a cluster the run's status.evaluation.meanStderr."""
    tasks: dict[str, float] = {}
    """Accuracy per task."""
    message: str = ""


class Comparison(Status):
    """The best arm by mean accuracy and whether its lead is larger than the noise."""

    best: str
    runner_up: str | None = None
    lead: float | None = None
    """Best mean minus the runner-up's."""
    stderr: float | None = None
    """Standard error of that difference: sqrt(se_best^2 + se_runner_up^2)."""
    exceeds_stderr: bool | None = None
    """Whether the lead is larger than one standard error (a hint, not a significance test)."""
    verdict: str = ""
    """The comparison in words, as `bloomctl study status` and the report say it: a tie (equal
    means) names no best arm; otherwise the best, its lead and whether that exceeds the stderr."""


class BloomStudyStatus(Status):
    phase: str | None = None
    message: str = ""
    observed_generation: int | None = None
    arms: list[ArmStatus] = []
    arm_count: int | None = None
    """Arms in the study (the printer column Arms)."""
    done: int | None = None
    """Arms trained and scored at the comparison point (the printer column Done)."""
    comparison: Comparison | None = None
    gpu_hours: float | None = None
    """GPU-hours used by all arms."""
    conditions: list[Condition] = []


class BloomStudy(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    api_version: Literal["bloomrun.io/v1alpha1"]
    kind: Literal["BloomStudy"]
    metadata: ObjectMeta
    spec: BloomStudySpec
    status: BloomStudyStatus | None = None


# --------------------------------------------------------------- merging and the arms


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: mappings merge key by key, null deletes a key, anything
    else (a list included) replaces. Neither argument is modified."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def spec_document(spec: BaseModel) -> dict:
    """A validated spec as the manifest wrote it: camelCase keys, only the fields given."""
    return as_sent(spec.model_dump(mode="json", by_alias=True, exclude_unset=True))


def _validate_run(document: dict, prefix: Callable[[tuple], str]) -> BloomRunSpec:
    """The document as a BloomRunSpec, as strictly as the API server checks a BloomRun; the
    error's fields are named after `prefix(loc of the first problem)`."""
    try:
        return BloomRunSpec.model_validate(document, strict=True, by_alias=True, by_name=False)
    except ValidationError as err:
        where = prefix(err.errors()[0]["loc"])
        raise StudyError(format_validation_error(err, where).replace("\n", "\\n")) from None


def _in_patch(patch: dict, loc: tuple) -> bool:
    node: Any = patch
    for key in loc:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def merged_specs(spec: BloomStudySpec) -> dict[str, BloomRunSpec]:
    """Each arm's base + patch, validated; an error names the arm and the field (the patch's
    field where the patch wrote it, else the merged spec's)."""
    base = spec_document(spec.base)
    merged = {}
    for index, arm in enumerate(spec.arms):
        at = f"spec.arms[{index}]"
        for section in ("eval", "budget"):
            if section in arm.patch:
                raise StudyError(f"{at}.patch.{section}: the study's {section} is spec.{section}, "
                                 "the same for every arm")

        def prefix(loc, at=at, arm=arm):
            # The patch's field where the patch wrote (part of) the path, else the merged spec's.
            if any(_in_patch(arm.patch, loc[:cut]) for cut in range(len(loc), 0, -1)):
                return f"{at}.patch"
            return f"{at} ({arm.name}), merged onto spec.base: spec"

        merged[arm.name] = _validate_run(merge_patch(base, as_sent(arm.patch)), prefix)
    return merged


def run_tokens(training: TrainingConfig, seq_length: int) -> int:
    """Tokens a run of this length trains on, as the trainer counts them (it ends at the first
    step that reaches trainTokens). Without a ramp-up, in closed form: run_length walks every
    step, which is a long loop for a long run with a small batch."""
    if training.rampup is None:
        step_tokens = training.global_batch_size * seq_length
        steps = training.train_steps or -(-training.train_tokens // step_tokens)
        return steps * step_tokens
    return run_length(training, seq_length)[1]


def _tflops(spec: BloomStudySpec) -> float:
    return gpu_tflops(spec.budget.gpu, spec.budget.achieved_tflops)


def arm_costs(spec: BloomStudySpec, merged: dict[str, BloomRunSpec] | None = None) -> dict[str, float]:
    """Each arm's estimated GPU-hours to compareAtTokens: 8 x parameters x tokens at the
    achieved TFLOP/s of the study's GPU type (the paper's arithmetic, with recompute)."""
    merged = merged_specs(spec) if merged is None else merged
    costs = {}
    for name, run in merged.items():
        seq = run.model.shape().seq_length
        tokens = run_tokens(_study_training(run, spec.compare_at_tokens), seq)
        costs[name] = gpu_hours(count_parameters(run.model), tokens, _tflops(spec))
    return costs


def budget_shares(spec: BloomStudySpec, costs: dict[str, float] | None = None) -> dict[str, float]:
    """Each arm's share of spec.budget.gpuHours, in proportion to its estimated cost."""
    costs = arm_costs(spec) if costs is None else costs
    total = sum(costs.values())
    return {name: spec.budget.gpu_hours * cost / total for name, cost in costs.items()}


def _study_training(run: BloomRunSpec, compare_at_tokens: int) -> TrainingConfig:
    return run.training.model_copy(update={"train_tokens": compare_at_tokens, "train_steps": None})


def _arm_document(spec: BloomStudySpec, run: BloomRunSpec, share: float) -> dict:
    """The arm's run: its merged spec trained to compareAtTokens on its own schedule, scored
    by the study's evaluation, within its share of the budget."""
    document = spec_document(run)
    seq = run.model.shape().seq_length
    full_tokens = run_tokens(run.training, seq)
    study_tokens = run_tokens(_study_training(run, spec.compare_at_tokens), seq)
    training = {k: v for k, v in document.get("training", {}).items() if k not in ("trainTokens", "trainSteps")}
    document["training"] = training | {"trainTokens": spec.compare_at_tokens}
    if run.optim.decay_tokens is None and full_tokens != study_tokens:
        # The cosine decay of the full run (it defaults to the run's length), not of the stop.
        document["optim"] = document.get("optim", {}) | {"decayTokens": full_tokens}
    document["eval"] = spec_document(spec.eval)
    document["budget"] = {"gpuHours": share}
    return document


def arm_specs(spec: BloomStudySpec) -> dict[str, BloomRunSpec]:
    """What each arm runs, by arm name: base + patch, trained to compareAtTokens, scored by
    spec.eval, within its budget share. StudyError names the arm and the field of a problem."""
    _check_base(spec)
    merged = merged_specs(spec)
    for index, arm in enumerate(spec.arms):
        run = merged[arm.name]
        seq = run.model.shape().seq_length
        full = run_tokens(run.training, seq)
        if full < spec.compare_at_tokens:
            raise StudyError(f"spec.compareAtTokens ({spec.compare_at_tokens:,}) is beyond the run of "
                             f"spec.arms[{index}] ({arm.name}): {_describe_length(run.training, seq)} "
                             f"= {full:,} tokens")
    shares = budget_shares(spec, arm_costs(spec, merged))
    specs = {}
    for index, arm in enumerate(spec.arms):
        at = f"spec.arms[{index}] ({arm.name}), trained to spec.compareAtTokens: spec"
        specs[arm.name] = _validate_run(_arm_document(spec, merged[arm.name], shares[arm.name]),
                                        lambda _loc, at=at: at)
    return specs


def _describe_length(training: TrainingConfig, seq: int) -> str:
    if training.train_steps is not None:
        return f"training.trainSteps {training.train_steps:,} x globalBatchSize {training.global_batch_size} x seq {seq}"
    return f"training.trainTokens {training.train_tokens:,}"


def _check_base(spec: BloomStudySpec) -> None:
    if spec.base.eval is not None:
        raise StudyError("spec.base.eval: the study's evaluation is spec.eval, the same for every arm")
    if spec.base.budget.gpu_hours is not None:
        raise StudyError("spec.base.budget: the study's budget is spec.budget (each arm gets its share)")


# What a comparison at equal tokens rests on: an arm that changes one of these compares
# something else than its knob (per-token losses over different tokenizers or sequence
# lengths are not comparable; another data order or initialisation measures seed noise).
BASIS: dict[str, Callable[[BloomRunSpec], Any]] = {
    "data.tokenizer": lambda run: run.data.tokenizer,
    "model.vocabSize": lambda run: run.model.shape().vocab_size,
    "model.seqLength": lambda run: run.model.shape().seq_length,
    "data.seed": lambda run: run.data.seed,
    "training.seed": lambda run: run.training.seed,
}


def basis_changes(base: BloomRunSpec, run: BloomRunSpec) -> list[str]:
    """'field old -> new' for each basis field the run changes."""
    return [f"{field} {get(base)} -> {get(run)}" for field, get in BASIS.items() if get(base) != get(run)]


def check_study(study: BloomStudy) -> dict[str, BloomRunSpec]:
    """Every refusal, first one found raised as StudyError naming the field; the arms' specs
    when the study can run."""
    spec = study.spec
    for index, arm in enumerate(spec.arms):
        name = arm_run_name(study.metadata.name, arm.name)
        if len(name) > MAX_RUN_NAME:
            raise StudyError(f"spec.arms[{index}].name: the arm's run {name!r} is longer than {MAX_RUN_NAME} "
                             "characters (metadata.name + '-' + arm name); shorten either")
    specs = arm_specs(spec)
    merged = merged_specs(spec)
    seen: dict[str, int] = {}
    for index, arm in enumerate(spec.arms):
        # Defaults included: {position: alibi} and {} are the same run when alibi is the default.
        key = json.dumps(merged[arm.name].model_dump(mode="json"), sort_keys=True)
        if key in seen:
            first = spec.arms[seen[key]]
            raise StudyError(f"spec.arms[{index}] ({arm.name}): equal to spec.arms[{seen[key]}] ({first.name}) "
                             "after merging onto spec.base: an arm must change something")
        seen[key] = index
        changes = basis_changes(spec.base, merged[arm.name])
        if changes and not arm.changes_basis:
            raise StudyError(f"spec.arms[{index}] ({arm.name}): changes the comparison's basis "
                             f"({'; '.join(changes)}); set spec.arms[{index}].changesBasis: true to compare it anyway")
    check_budget(spec)
    return specs


def check_budget(spec: BloomStudySpec) -> None:
    costs = arm_costs(spec)
    total = sum(costs.values())
    if total > spec.budget.gpu_hours:
        each = ", ".join(f"{name} {cost:,.4g}" for name, cost in costs.items())
        raise StudyError(
            f"spec.budget.gpuHours ({spec.budget.gpu_hours:,.4g}) is below the arms' estimated cost, "
            f"{total:,.4g} GPU-hours ({each}): 8 x parameters x {spec.compare_at_tokens:,} tokens "
            f"at {_tflops(spec):g} TFLOP/s per GPU ({spec.budget.gpu})")


# ----------------------------------------------------------------- the arms' BloomRuns


def arm_run_name(study_name: str, arm_name: str) -> str:
    return f"{study_name}-{arm_name}"


def arm_labels(study_name: str, arm_name: str) -> dict[str, str]:
    return {STUDY_LABEL: study_name, ARM_LABEL: arm_name}


def arm_manifest(study: BloomStudy, arm_name: str, spec: BloomRunSpec | None = None) -> dict:
    """The BloomRun document of one arm (metadata: its run name, the study's namespace, the
    study and arm labels); `spec` defaults to arm_specs(study.spec)[arm_name]."""
    spec = arm_specs(study.spec)[arm_name] if spec is None else spec
    metadata = {"name": arm_run_name(study.metadata.name, arm_name),
                "labels": arm_labels(study.metadata.name, arm_name)}
    if study.metadata.namespace:
        metadata["namespace"] = study.metadata.namespace
    return {"apiVersion": API_VERSION, "kind": "BloomRun", "metadata": metadata, "spec": spec_document(spec)}


# ------------------------------------------------------------------------- comparison


def compare(arms: list[ArmStatus]) -> Comparison | None:
    """The best arm by mean accuracy among those scored, and its lead over the runner-up
    against the standard error of that difference. One rule for a local study and the
    operator's status, so both reach the same verdict from the same numbers."""
    scored = sorted((a for a in arms if a.mean is not None), key=lambda a: a.mean, reverse=True)
    if not scored:
        return None
    best = scored[0]
    if len(scored) == 1:
        result = Comparison(best=best.name)
    else:
        second = scored[1]
        lead = best.mean - second.mean
        stderr = (math.sqrt(best.stderr ** 2 + second.stderr ** 2)
                  if best.stderr is not None and second.stderr is not None else None)
        result = Comparison(best=best.name, runner_up=second.name, lead=lead, stderr=stderr,
                            exceeds_stderr=None if stderr is None else lead > stderr)
    result.verdict = describe(result)
    return result


def describe(result: Comparison | None) -> str:
    """The comparison in words (Comparison.verdict)."""
    if result is None:
        return "best arm: none scored at the comparison point yet"
    if result.runner_up is None:
        return f"best arm: {result.best} (the only one scored)"
    if result.lead == 0:
        return f"best arm: none, {result.best} and {result.runner_up} tie at the comparison point"
    if result.stderr is None:
        return f"best arm: {result.best}, {result.lead:+.4f} over {result.runner_up} (no stderr to compare with)"
    verdict = "exceeds" if result.exceeds_stderr else "is within"
    return (f"best arm: {result.best}, {result.lead:+.4f} mean acc over {result.runner_up}, which {verdict} "
            f"the evaluation's standard error ({result.stderr:.4f})")


# ---------------------------------------------------------------------------- loading


def parse_study(document: Any) -> BloomStudy:
    """Validate a parsed YAML/JSON document as a BloomStudy (strictly, as parse_manifest
    does a BloomRun), then every rule of check_study."""
    if not isinstance(document, dict):
        raise StudyError(f"a BloomStudy manifest is a mapping, got {type(document).__name__}")
    document = as_sent(document)
    kind, api_version = document.get("kind"), document.get("apiVersion")
    if kind != KIND:
        raise StudyError(f"kind: expected {KIND!r}, got {kind!r}")
    if api_version != API_VERSION:
        raise StudyError(f"apiVersion: expected {API_VERSION!r}, got {api_version!r}")
    spec = document.get("spec")
    if isinstance(spec, dict) and isinstance(spec.get("base"), dict):
        # The API server drops a base's non-nullable nulls as it does a BloomRun's.
        spec["base"] = prune_nulls({"spec": spec["base"]})["spec"]
    try:
        study = BloomStudy.model_validate(document, strict=True, by_alias=True, by_name=False)
    except ValidationError as err:
        raise StudyError(format_validation_error(err).replace("\n", "\\n")) from None
    check_study(study)
    return study


def load_study_text(text: str, source: str) -> BloomStudy:
    """Validate the text of a study manifest (one YAML document); errors name `source`."""
    try:
        document = read_document(text, source)
    except ManifestError as err:
        raise StudyError(str(err)) from None
    try:
        return parse_study(document)
    except ManifestError as err:
        raise StudyError(f"{source}: {err}") from None


def load_study(path: str | Path) -> BloomStudy:
    """Read and validate a BloomStudy manifest file."""
    try:
        text = read_manifest_file(path)
    except ManifestError as err:
        raise StudyError(str(err)) from None
    return load_study_text(text, str(path))
