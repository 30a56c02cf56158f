"""The BloomRun resource: spec and status as pydantic models.

One source of truth: `BloomRunSpec` *is* the trainer's `TrainerConfig` plus the cluster's
fields, so the trainer, `bloomctl run`, `bloomctl validate`, the operator and the CRD
(generated from these models by `bloomrun.operator.crd`) cannot disagree about a field.

Importable without kopf or the Kubernetes client: `bloomctl validate` and the trainer's
helpers use it on machines that have neither.
"""

from __future__ import annotations

import copy
import datetime
import functools
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from bloomrun.trainer.config import (PRESETS, CheckpointConfig, EvalConfig, Section, TrainerConfig,
                                     format_validation_error)
from bloomrun.trainer.config import MAX_STEPS

GROUP = "bloomrun.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "BloomRun"
PLURAL = "bloomruns"
SHORT_NAME = "br"

# Children are named `<run>-worker-<index>` and the rendezvous host is reached as
# `<run>-worker-0.<run>`: both are DNS-1035 labels (at most 63 characters, starting with
# a letter), so a run name keeps room for the longest suffix.
MAX_RUN_NAME = 40
RUN_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_NODES = 1024
DEFAULT_IMAGE = "ghcr.io/bloomrun/trainer:0.1.0"
DEFAULT_CHECKPOINT_MOUNT = "/checkpoints"

# Set by torchrun (or its PET_* argument form) and by the operator in every worker: a user
# value would silently change the rendezvous or the rank layout, so the spec refuses them.
RESERVED_ENV_NAMES = (
    "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
    "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE",
    "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE",
)
RESERVED_ENV_PREFIXES = ("TORCHELASTIC_", "PET_", "BLOOMRUN_")

# Exit codes of a worker that was killed by a signal (128 + n): SIGABRT (NCCL watchdog),
# SIGBUS, SIGKILL, SIGSEGV, SIGTERM. Ordinary non-zero exits (bad config, missing data) are
# permanent: restarting would fail the same way, as Kubeflow's ExitCode policy also assumes.
DEFAULT_RETRYABLE_EXIT_CODES = [134, 135, 137, 139, 143]

# Kubernetes' quantity grammar (k8s.io/apimachinery resource.ParseQuantity) without the sign
# a resource cannot have: digits with an optional fraction, then a binary (Ki..Ei) or decimal
# (n, u, m, k, M..E) suffix or an integer exponent.
QUANTITY_PATTERN = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$"
MAX_QUANTITY_INT = 2**53 - 1  # JSON carries larger integers as floats, which the API server refuses


def _quantity_to_str(value: Any) -> Any:
    # Kubernetes quantities may be written as integers in YAML (`cpu: 4`); a float (1.5) is
    # not an int-or-string for the API server, so it stays a float and is refused.
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= MAX_QUANTITY_INT:
            raise ValueError(f"a quantity is a non-negative integer up to {MAX_QUANTITY_INT} or a string")
        return str(value)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    Field(pattern=QUANTITY_PATTERN, max_length=64),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer", "minimum": 0, "maximum": MAX_QUANTITY_INT},
                      {"type": "string", "pattern": QUANTITY_PATTERN, "maxLength": 64}],
        }
    ),
]

# Kubernetes names (k8s.io/apimachinery/pkg/util/validation): DNS-1123 labels and subdomains,
# label values, and qualified names (label, annotation and resource keys: an optional
# DNS-subdomain prefix of at most 253 characters and '/', then a name of at most 63).
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
DNS_SUBDOMAIN_PATTERN = f"^{_SUBDOMAIN}$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
QUALIFIED_NAME_PATTERN = f"^({_SUBDOMAIN}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
QUALIFIED_NAME_RULE = (f"k.matches('{QUALIFIED_NAME_PATTERN}') && (!k.contains('/') || k.indexOf('/') <= 253)"
                       .replace("\\", "\\\\"))
QUALIFIED_NAME_MESSAGE = ("must be a qualified name: an optional DNS-subdomain prefix and '/', then at most 63 "
                          "letters, digits, '-', '_' or '.', starting and ending with a letter or digit")


def is_qualified_name(key: str) -> bool:
    """A label, annotation or resource key as Kubernetes' IsQualifiedName has it."""
    return re.fullmatch(QUALIFIED_NAME_PATTERN, key) is not None and (
        "/" not in key or key.index("/") <= 253)


def _qualified_name(key: str) -> str:
    if not is_qualified_name(key):
        raise ValueError(f"key {key!r} {QUALIFIED_NAME_MESSAGE}")
    return key


QualifiedName = Annotated[str, Field(max_length=317), AfterValidator(_qualified_name)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]
DnsSubdomain = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]


def keys_rule(what: str) -> dict:
    """CEL twin of a map whose keys are QualifiedName."""
    return Cel.rules((f"self.all(k, {QUALIFIED_NAME_RULE})", f"{what} keys {QUALIFIED_NAME_MESSAGE}"))


LabelMap = Annotated[dict[QualifiedName, LabelValue], Field(max_length=64)]


class Cel:
    """CEL rules (x-kubernetes-validations) the API server enforces for a model.

    Each pydantic validator below has its rule beside it, so the offline check and the
    API server's check are written side by side; the CRD generator attaches them.
    """

    @staticmethod
    def rules(*rules: tuple[str, ...]) -> dict:
        """Each (rule, message), or (rule, message, messageExpression): a message the API
        server computes, to name the values at fault (the static message is its fallback)."""
        keys = ("rule", "message", "messageExpression")
        return {"x-kubernetes-validations": [dict(zip(keys, rule)) for rule in rules]}


# --------------------------------------------------------------------- cluster fields


class NodeRange(Section):
    """Worker pods (one per node): elastic between min and max."""

    model_config = ConfigDict(
        json_schema_extra=Cel.rules(("self.min <= self.max", "nodes.min must not exceed nodes.max"))
    )

    min: int = Field(default=1, ge=1, le=MAX_NODES)
    """Fewest nodes the run trains on; with fewer schedulable it waits in Pending."""
    max: int = Field(default=1, ge=1, le=MAX_NODES)
    """Most nodes; the run scales up to this when capacity is there."""

    @model_validator(mode="after")
    def _check_range(self) -> "NodeRange":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class Toleration(Section):
    """A Kubernetes toleration, with the rules the API server checks on the pod
    (k8s.io/kubernetes/pkg/apis/core/validation ValidateTolerations)."""

    model_config = ConfigDict(
        json_schema_extra=Cel.rules(
            (f"!has(self.key) || self.key == '' || {QUALIFIED_NAME_RULE.replace('k.', 'self.key.')}",
             f"key {QUALIFIED_NAME_MESSAGE}"),
            ("(has(self.key) && self.key != '') || self.operator == 'Exists'",
             "a toleration without a key must use operator Exists"),
            ("self.operator != 'Exists' || !has(self.value) || self.value == ''",
             "operator Exists takes no value"),
            ("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
             "tolerationSeconds needs effect NoExecute"),
        )
    )

    key: str | None = Field(default=None, max_length=317)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0, le=10**9)

    @model_validator(mode="after")
    def _check_rules(self) -> "Toleration":
        if self.key and not is_qualified_name(self.key):
            raise ValueError(f"key {QUALIFIED_NAME_MESSAGE}")
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key must use operator Exists")
        if self.operator == "Exists" and self.value:
            raise ValueError("operator Exists takes no value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


# ------------------------------------------------------------------------- affinity
#
# Kubernetes' Affinity as typed models (k8s.io/api/core/v1), not an opaque object: the API
# server's CEL can read a typed field (not one under x-kubernetes-preserve-unknown-fields),
# so cross-namespace terms and the denied node label keys (bloomrun.operator.admission) are
# refused where the run is created, and every list is bounded, so an affinity cannot grow
# each of a run's pods without limit (issue 20: etcd). The bounds are far above real use.
MAX_TERMS = 8
MAX_REQUIREMENTS = 16
MAX_VALUES = 32

REQUIREMENT_VALUES_MESSAGE = ("operators In and NotIn need values, Exists and DoesNotExist take none, "
                              "Gt and Lt take one integer")
REQUIREMENT_VALUES_RULE = (
    "self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0"
    " : self.operator in ['Exists', 'DoesNotExist'] ? !has(self.values) || size(self.values) == 0"
    " : has(self.values) && size(self.values) == 1 && self.values[0].matches('^[-+]?[0-9]{1,18}$')"
)


def _requirement_values_fit(operator: str, values: list[str] | None) -> bool:
    if operator in ("In", "NotIn"):
        return bool(values)
    if operator in ("Exists", "DoesNotExist"):
        return not values
    return values is not None and len(values) == 1 and re.fullmatch(r"[-+]?[0-9]{1,18}", values[0]) is not None


class NodeSelectorRequirement(Section):
    """A node label (or field) and the values it may or may not have."""

    model_config = ConfigDict(json_schema_extra=Cel.rules((REQUIREMENT_VALUES_RULE, REQUIREMENT_VALUES_MESSAGE)))

    key: QualifiedName
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[Annotated[str, Field(max_length=63)]] | None = Field(default=None, max_length=MAX_VALUES)

    @model_validator(mode="after")
    def _check_values(self) -> "NodeSelectorRequirement":
        if not _requirement_values_fit(self.operator, self.values):
            raise ValueError(REQUIREMENT_VALUES_MESSAGE)
        return self


class LabelSelectorRequirement(NodeSelectorRequirement):
    """A pod label and the values it may or may not have (no Gt/Lt for pods)."""

    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]


class NodeSelectorTerm(Section):
    match_expressions: list[NodeSelectorRequirement] | None = Field(default=None, max_length=MAX_REQUIREMENTS)
    match_fields: list[NodeSelectorRequirement] | None = Field(default=None, max_length=MAX_REQUIREMENTS)


class NodeSelector(Section):
    node_selector_terms: list[NodeSelectorTerm] = Field(min_length=1, max_length=MAX_TERMS)


class PreferredSchedulingTerm(Section):
    weight: int = Field(ge=1, le=100)
    preference: NodeSelectorTerm


class NodeAffinity(Section):
    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] | None = Field(
        default=None, max_length=MAX_TERMS)


class LabelSelector(Section):
    match_labels: Annotated[dict[QualifiedName, LabelValue], Field(max_length=MAX_REQUIREMENTS)] | None = Field(
        default=None, json_schema_extra=keys_rule("matchLabels"))
    match_expressions: list[LabelSelectorRequirement] | None = Field(default=None, max_length=MAX_REQUIREMENTS)


CROSS_NAMESPACE_MESSAGE = ("namespaces and namespaceSelector are refused: a run's pods are placed relative to "
                           "pods of its own namespace only")


class PodAffinityTerm(Section):
    """Pods (of the run's own namespace) to be near, or away from, within a topology."""

    model_config = ConfigDict(json_schema_extra=Cel.rules(
        ("!has(self.namespaces) && !has(self.namespaceSelector)", CROSS_NAMESPACE_MESSAGE)))

    label_selector: LabelSelector | None = None
    topology_key: QualifiedName
    namespaces: list[Annotated[str, Field(max_length=63)]] | None = Field(default=None, max_length=1)
    """Refused: it would place the run relative to another tenant's pods (and reveal them)."""
    namespace_selector: LabelSelector | None = None
    """Refused, like namespaces."""
    match_label_keys: list[QualifiedName] | None = Field(default=None, max_length=MAX_REQUIREMENTS)
    mismatch_label_keys: list[QualifiedName] | None = Field(default=None, max_length=MAX_REQUIREMENTS)

    @model_validator(mode="after")
    def _own_namespace(self) -> "PodAffinityTerm":
        if self.namespaces is not None or self.namespace_selector is not None:
            raise ValueError(CROSS_NAMESPACE_MESSAGE)
        return self


class WeightedPodAffinityTerm(Section):
    weight: int = Field(ge=1, le=100)
    pod_affinity_term: PodAffinityTerm


class PodAffinity(Section):
    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] | None = Field(
        default=None, max_length=MAX_TERMS)
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] | None = Field(
        default=None, max_length=MAX_TERMS)


class Affinity(Section):
    """A Kubernetes Pod affinity (the pod's spec.affinity), copied into each worker pod."""

    node_affinity: NodeAffinity | None = None
    pod_affinity: PodAffinity | None = None
    pod_anti_affinity: PodAffinity | None = None


class Pool(Section):
    """Where the workers may run: a GPU node pool."""

    node_selector: LabelMap = Field(default={}, json_schema_extra=keys_rule("nodeSelector"))
    """Node labels a worker's node must carry (e.g. nvidia.com/gpu.product)."""
    tolerations: list[Toleration] = Field(default=[], max_length=32)
    """Taints the workers tolerate; the nvidia.com/gpu taint is tolerated automatically."""
    affinity: Affinity | None = None
    """A Kubernetes Pod affinity (node, pod and anti-affinity terms), copied into each worker."""

    def manifest_affinity(self) -> dict | None:
        """The affinity as the pod spec has it (only what the manifest gave)."""
        return self.affinity.model_dump(by_alias=True, exclude_none=True) if self.affinity else None


class ResourceRequirements(Section):
    """CPU, memory and other resources of each worker; GPUs come from gpusPerNode."""

    model_config = ConfigDict(
        json_schema_extra=Cel.rules(
            (
                "!has(self.limits) || !('nvidia.com/gpu' in self.limits)",
                "set GPUs with spec.gpusPerNode, not resources.limits",
            ),
            (
                "!has(self.requests) || !('nvidia.com/gpu' in self.requests)",
                "set GPUs with spec.gpusPerNode, not resources.requests",
            ),
        )
    )

    requests: dict[QualifiedName, Quantity] = Field(default={}, max_length=16, json_schema_extra=keys_rule("requests"))
    limits: dict[QualifiedName, Quantity] = Field(default={}, max_length=16, json_schema_extra=keys_rule("limits"))

    @model_validator(mode="after")
    def _no_gpus(self) -> "ResourceRequirements":
        for kind, values in (("limits", self.limits), ("requests", self.requests)):
            if "nvidia.com/gpu" in values:
                raise ValueError(f"set GPUs with spec.gpusPerNode, not resources.{kind}")
        return self


LAUNCHER_CHECKPOINT_DIR = ("set by the launcher, not the manifest: bloomctl run uses runs/<name>/checkpoints, "
                           "a pod its checkpointVolume's mountPath")


class RunCheckpointConfig(CheckpointConfig):
    """The trainer's checkpoint section as a BloomRun has it: every field but `dir`."""

    model_config = ConfigDict(
        json_schema_extra=Cel.rules(("!has(self.dir)", f"checkpoint.dir is {LAUNCHER_CHECKPOINT_DIR}"))
    )

    dir: str | None = None
    """Refused: bloomctl run and the operator decide where checkpoints go."""

    @field_validator("dir")
    @classmethod
    def _not_given(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(LAUNCHER_CHECKPOINT_DIR)
        return value


class CheckpointVolume(Section):
    claim_name: DnsSubdomain | None = None
    """PersistentVolumeClaim holding checkpoints (ReadWriteMany across nodes); required when
    nodes.max > 1. Without one (a one-node run) checkpoints live in an emptyDir and do not
    survive a pod's replacement."""
    mount_path: str = Field(default=DEFAULT_CHECKPOINT_MOUNT, pattern=r"^/[^:]*$", max_length=255)
    """Where the volume is mounted; the operator sets the trainer's checkpoint.dir to it."""


class DataVolume(Section):
    claim_name: DnsSubdomain | None = None
    """PersistentVolumeClaim holding the pretokenized corpora (data.sources paths point into it)."""
    mount_path: str = Field(default="/data", pattern=r"^/[^:]*$", max_length=255)
    """Where it is mounted (read-only); in a pod, relative data paths are relative to it."""


class HangPolicy(Section):
    max_restarts: int = Field(default=5, ge=0, le=10_000)
    """Replacements of pods whose rank hung (reason Hung, the trainer's watchdog) before the
    run is marked Failed; they count toward maxRestarts as well."""
    backoff_seconds: int = Field(default=60, ge=0, le=3600)
    """Wait before replacing a pod whose rank hung; doubles with each further hang (capped at
    10 min): a hung GPU or link often needs its node drained, and the scheduler may otherwise
    put the replacement straight back on it."""


class RestartPolicy(Section):
    max_restarts: int = Field(default=10, ge=0, le=10_000)
    """Worker replacements allowed before the run is marked Failed."""
    backoff_seconds: int = Field(default=10, ge=0, le=3600)
    """Wait before the first replacement; doubles with each further restart (capped at 10 min)."""
    retryable_exit_codes: list[Annotated[int, Field(ge=1, le=255)]] = Field(
        default=DEFAULT_RETRYABLE_EXIT_CODES, max_length=255
    )
    """Exit codes that restart the worker; any other non-zero code fails the run."""
    hang: HangPolicy = HangPolicy()
    """Restarts after a hang, which the trainer's watchdog detects (docs/trainer.md)."""


class Budget(Section):
    gpu_hours: float | None = Field(default=None, gt=0, le=1e9)
    """GPU-hours (nodes x GPUs x running time) after which the run checkpoints and stops."""


class RunEvalConfig(EvalConfig):
    """The trainer's eval section as a BloomRun has it: what to score, plus where the
    operator's evaluation Jobs run (one Job per checkpoint scored; docs/eval.md)."""

    model_config = ConfigDict(
        json_schema_extra=Cel.rules(
            ("!has(self.taskDataClaimName) || (has(self.taskDataDir) && self.taskDataDir.startsWith('/'))",
             "eval.taskDataClaimName needs eval.taskDataDir, an absolute path: where the claim is mounted"),
        )
    )

    pool: Pool | None = None
    """Node pool of the evaluation Jobs; unset: the run's own pool."""
    gpus: int | None = Field(default=None, ge=0, le=16)
    """GPUs per evaluation Job; unset: 1 when the run's workers have GPUs, else 0 (CPU)."""
    resources: ResourceRequirements = ResourceRequirements()
    """CPU and memory of each evaluation Job (GPUs come from gpus)."""
    max_concurrent: int = Field(default=1, ge=1, le=64)
    """Evaluation Jobs of this run running at once; further due checkpoints wait in a queue."""
    backoff_limit: int = Field(default=2, ge=0, le=20)
    """Retries of a crashed evaluation pod (the Job's backoffLimit); a clear error (exit code
    2: missing checkpoint, unstaged task data) is not retried."""
    priority_class_name: DnsSubdomain | None = None
    """PriorityClass of the evaluation pods: a lower one than the workers' keeps evaluation on
    a shared pool from taking a GPU a replacement worker needs."""
    task_data_claim_name: DnsSubdomain | None = None
    """PersistentVolumeClaim holding the staged task data, mounted read-only at taskDataDir;
    unset: taskDataDir is a path on the data volume (relative to its mountPath) or in the image."""

    @model_validator(mode="after")
    def _check_task_data_claim(self) -> "RunEvalConfig":
        if self.task_data_claim_name and not (self.task_data_dir or "").startswith("/"):
            raise ValueError("eval.taskDataClaimName needs eval.taskDataDir, an absolute path: where the claim "
                             "is mounted")
        return self

    def trainer_section(self) -> EvalConfig:
        """The trainer's eval section (what bloomctl eval reads), without the cluster's fields."""
        fields = {name: getattr(self, name) for name in EvalConfig.model_fields}
        return EvalConfig.model_construct(_fields_set=self.model_fields_set & set(fields), **fields)


ENV_NAME_RULE = (
    "!(self.name in " + repr(list(RESERVED_ENV_NAMES)).replace('"', "'") + ") && "
    + " && ".join(f"!self.name.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES)
)


class EnvVar(Section):
    model_config = ConfigDict(
        json_schema_extra=Cel.rules(
            (ENV_NAME_RULE, "env name is reserved: torchrun or the operator sets it")
        )
    )

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)
    value: str = Field(default="", max_length=32768)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES):
            raise ValueError(f"{name} is reserved: torchrun or the operator sets it")
        return name


# --------------------------------------------------------------------- parallel layout

def layout_refusal(tensor: int, pipeline: int, gpus_per_node: int, nodes_min: int, nodes_max: int) -> str | None:
    """Why a (tensor x pipeline) layout cannot be placed on these nodes, or None.

    A tensor group exchanges activations twice per layer, so its ranks are one node's
    processes (torchrun local ranks: the operator gives consecutive ranks to a node); a
    pipeline replica (tensor x pipeline ranks) fills whole nodes or a whole share of one, and
    elastic scaling adds or removes whole replicas, so both ends of the node range hold whole
    replicas (BLOOM-176B: 4 x 12 = 48 ranks = 6 nodes of 8, 48 nodes = 8 replicas)."""
    per_node = max(gpus_per_node, 1)  # gpusPerNode 0: one CPU process per node
    if tensor > 1 and (tensor > per_node or per_node % tensor):
        return (f"parallel.tensor ({tensor}) must not exceed gpusPerNode ({gpus_per_node}) and must divide it: "
                "a tensor group's ranks stay on one node")
    replica = tensor * pipeline
    if replica <= per_node:
        if per_node % replica:
            return (f"parallel.tensor x parallel.pipeline ({replica}) must divide gpusPerNode ({gpus_per_node}) "
                    "or be a multiple of it: a node holds whole pipelines")
        return None
    if replica % per_node:
        return (f"parallel.tensor x parallel.pipeline ({replica}) must be a multiple of gpusPerNode "
                f"({gpus_per_node}) or divide it: a pipeline takes whole nodes")
    span = replica // per_node
    if nodes_min % span or nodes_max % span:
        return (f"nodes.min ({nodes_min}) and nodes.max ({nodes_max}) must be multiples of {span}, the nodes one "
                f"pipeline replica takes ({tensor} x {pipeline} ranks on {gpus_per_node} per node): scaling adds or "
                "removes whole replicas")
    return None


def _model_value(camel: str, attr: str) -> str:
    """CEL: spec.model's field if given, else its preset's (ModelConfig.shape's rule)."""
    table = ", ".join(f"'{name}': {getattr(shape, attr)}" for name, shape in PRESETS.items())
    return f"(has(self.model.{camel}) ? self.model.{camel} : {{{table}}}[self.model.preset])"


_TENSOR, _PIPELINE = "self.parallel.tensor", "self.parallel.pipeline"
_PER_NODE = "(self.gpusPerNode == 0 ? 1 : self.gpusPerNode)"
_REPLICA = f"({_TENSOR} * {_PIPELINE})"
# The CEL twins of config.check_parallel and layout_refusal, in the same order.
PARALLEL_RULES = (
    (f"!has(self.parallel) || {_model_value('numHeads', 'num_heads')} % {_TENSOR} == 0",
     "parallel.tensor must divide model.numHeads (and so hiddenSize): each tensor rank computes whole heads"),
    (f"!has(self.parallel) || {_PIPELINE} == 1 || ({_model_value('numLayers', 'num_layers')} + 2) % {_PIPELINE} == 0",
     "parallel.pipeline must divide model.numLayers + 2: the embedding and the head take one layer's slot each"),
    (f"!has(self.parallel) || {_PIPELINE} == 1 || self.training.zeroStage <= 1",
     "training.zeroStage 2 and 3 do not compose with parallel.pipeline: use ZeRO 0 or 1 (stage 2 would "
     "reduce-scatter the gradients after every micro-batch, stage 3 gather each stage's weights for every micro-batch)"),
    (f"!has(self.parallel) || {_TENSOR} == 1 || ({_TENSOR} <= {_PER_NODE} && {_PER_NODE} % {_TENSOR} == 0)",
     "parallel.tensor must not exceed gpusPerNode and must divide it: a tensor group's ranks stay on one node"),
    (f"!has(self.parallel) || ({_REPLICA} <= {_PER_NODE} ? {_PER_NODE} % {_REPLICA} == 0"
     f" : {_REPLICA} % {_PER_NODE} == 0 && self.nodes.min % ({_REPLICA} / {_PER_NODE}) == 0"
     f" && self.nodes.max % ({_REPLICA} / {_PER_NODE}) == 0)",
     "parallel.tensor x parallel.pipeline must divide gpusPerNode, or be a multiple of it with nodes.min and "
     "nodes.max multiples of the nodes one pipeline replica takes: scaling adds or removes whole replicas"),
)


_SEQ = ("(has(self.model.seqLength) ? self.model.seqLength : {"
        + ", ".join(f"'{name}': {shape.seq_length}" for name, shape in PRESETS.items()) + "}[self.model.preset])")
_STEP_TOKENS = f"(self.training.globalBatchSize * {_SEQ})"
WARMUP_RULE = (
    "!has(self.optim.warmupTokens) || (has(self.training.trainTokens)"
    " ? self.optim.warmupTokens <= self.training.trainTokens"
    f" : !has(self.training.trainSteps) || (self.optim.warmupTokens + {_STEP_TOKENS} - 1) / {_STEP_TOKENS}"
    " <= self.training.trainSteps)"
)
RAMPUP_RULE = (
    "!has(self.training.rampup) || (has(self.training.trainTokens)"
    f" ? self.training.rampup.samples <= self.training.trainTokens / {_SEQ}"
    " : !has(self.training.trainSteps)"
    " || self.training.rampup.samples <= self.training.trainSteps * self.training.globalBatchSize)"
)


# --------------------------------------------------------------- world sizes x ramp-up

# torchrun's elastic rendezvous forms the group with whatever workers are there: any count in
# nodes.min..nodes.max (after a node loss the survivors re-form at once, before the operator
# could act), and neither torchrun nor the operator can hold out for a count that suits the
# batch. The trainer splits every step's global batch evenly, each rank the same whole number
# of micro-batches (bloomrun.trainer.schedule.check_divisible), and raises otherwise. So a
# BloomRun is refused unless every world size its range allows divides every global batch its
# ramp-up goes through (docs/operator.md, "Elastic sizes and the batch").
#
# The CEL twin loops over at most MAX_NODE_COUNTS offsets from nodes.min (an unbounded
# `lists.range` is over the API server's cost budget), and a wider range is refused on both
# sides. Nothing exact is lost: each j <= k divides one of any k consecutive node counts, so
# a range of k counts needs lcm(1..k) to divide batch / (micro-batch x GPUs), and lcm(1..19)
# already exceeds MAX_GLOBAL_BATCH: no batch divides over more than 18 consecutive counts.
MAX_NODE_COUNTS = 64


def ramp_batches(training) -> tuple[int, ...]:
    """The global batches a run may step with, as a rule rather than a list: the ramp-up's
    first stage and its increment (every stage start + k x increment is a multiple of m
    exactly when both are, the ramp having at least two stages), and globalBatchSize. A
    stage that a short ramp steps over still counts: the rule is the stages, not the steps."""
    ramp, target = training.rampup, training.global_batch_size
    if ramp is None or ramp.start >= target:
        return (target,)
    return (ramp.start, ramp.increment, target)


def _stages_not_multiple(training, multiple: int, limit: int = 3) -> list[int]:
    """The first `limit` ramp stages (or globalBatchSize) that are not multiples of `multiple`.
    When the increment is not a multiple, one of any two consecutive stages is not either,
    so the scan ends within 2 x limit stages."""
    ramp, target = training.rampup, training.global_batch_size
    stages = range(ramp.start, target + 1, ramp.increment) if ramp and ramp.start < target else (target,)
    bad: list[int] = []
    for batch in stages:
        if batch % multiple:
            bad.append(batch)
            if len(bad) == limit:
                break
    return bad


def world_size_refusals(spec: "BloomRunSpec") -> list[str]:
    """Each node count of the spec's range that some global batch does not divide over,
    with the ranks it has and the batches it cannot split. The batch is split over the
    data-parallel ranks: world / (tensor x pipeline), so a count must also hold whole
    model-parallel replicas (bloomrun.trainer.parallel.data_parallel raises otherwise)."""
    training, per_node = spec.training, max(spec.gpus_per_node, 1)
    replica = spec.parallel.tensor * spec.parallel.pipeline
    refusals = []
    for nodes in range(spec.nodes.min, spec.nodes.max + 1):
        ranks = nodes * per_node
        counted = f"{nodes} node{'s' * (nodes > 1)} = {ranks} ranks"
        if ranks % replica:
            refusals.append(f"{counted} hold no whole number of tensor x pipeline replicas ({replica} ranks)")
            continue
        data_ranks = ranks // replica
        multiple = data_ranks * training.micro_batch_size
        if all(batch % multiple == 0 for batch in ramp_batches(training)):
            continue
        bad = _stages_not_multiple(training, multiple)
        data = f" ({data_ranks} data-parallel)" if replica > 1 else ""
        refusals.append(f"{counted}{data} need multiples of {multiple}, not {', '.join(map(str, bad))}")
    return refusals


_OFFSETS = "[" + ", ".join(map(str, range(MAX_NODE_COUNTS))) + "]"
_RANKS = "((self.gpusPerNode == 0 ? 1 : self.gpusPerNode) * (self.nodes.min + i))"
_REPLICA_RANKS = "(has(self.parallel) ? self.parallel.tensor * self.parallel.pipeline : 1)"
_MULTIPLE = f"(self.training.microBatchSize * ({_RANKS} / {_REPLICA_RANKS}))"
_SIZE_FITS = (
    f"self.nodes.min + i > self.nodes.max || ({_RANKS} % {_REPLICA_RANKS} == 0"
    f" && self.training.globalBatchSize % {_MULTIPLE} == 0"
    " && (!has(self.training.rampup) || self.training.rampup.start >= self.training.globalBatchSize"
    f" || (self.training.rampup.start % {_MULTIPLE} == 0 && self.training.rampup.increment % {_MULTIPLE} == 0)))"
)
NODE_SPAN_RULE = f"self.nodes.max - self.nodes.min < {MAX_NODE_COUNTS}"
WORLD_SIZE_RULE = f"!({NODE_SPAN_RULE}) || {_OFFSETS}.all(i, {_SIZE_FITS})"
WORLD_SIZE_MESSAGE = ("every world size of nodes.min..nodes.max x gpusPerNode must split each global batch of the "
                      "run (rampup.start, start + increment, ..., training.globalBatchSize) into whole micro-batches "
                      "(training.microBatchSize) per data-parallel rank (world / (parallel.tensor x pipeline))")


# --------------------------------------------------------------- what pods carry

# Each worker pod carries the run's env and pool (node selector, tolerations, affinity), and
# a run has up to nodes.max of them: one manifest could put ~1.25 GiB into etcd that way
# (issue 20: 64 env values of 32 KiB in 1,024 pods). One limit on the text those fields hold,
# counted the same way here and in CEL: every string a user writes there (names and values,
# keys and values of maps, selector keys, values and topology keys), in characters.
POD_TEXT_MAX_CHARS = 32 * 1024
POD_TEXT_MESSAGE = (f"spec.env and spec.pool together hold at most {POD_TEXT_MAX_CHARS} characters of names and "
                    "values: each is copied into every worker pod")


def _requirements_chars(requirements) -> int:
    return sum(len(r.key) + sum(map(len, r.values or ())) for r in requirements or ())


def _labels_chars(labels) -> int:
    return sum(len(k) + len(v) for k, v in (labels or {}).items())


def _node_term_chars(term: NodeSelectorTerm) -> int:
    return _requirements_chars(term.match_expressions) + _requirements_chars(term.match_fields)


def _pod_term_chars(term: PodAffinityTerm) -> int:
    selector = term.label_selector
    return (len(term.topology_key)
            + (_labels_chars(selector.match_labels) + _requirements_chars(selector.match_expressions) if selector else 0)
            + sum(map(len, term.match_label_keys or ())) + sum(map(len, term.mismatch_label_keys or ())))


def _pod_affinity_chars(affinity: PodAffinity | None) -> int:
    if affinity is None:
        return 0
    return (sum(map(_pod_term_chars, affinity.required_during_scheduling_ignored_during_execution or ()))
            + sum(_pod_term_chars(w.pod_affinity_term)
                  for w in affinity.preferred_during_scheduling_ignored_during_execution or ()))


def pod_text_chars(env: list, pool: Pool) -> int:
    """Characters of user text each worker pod carries (POD_TEXT_CHARS_CEL is its twin)."""
    total = sum(len(e.name) + len(e.value) for e in env)
    total += _labels_chars(pool.node_selector) + sum(len(t.key or "") + len(t.value or "") for t in pool.tolerations)
    affinity = pool.affinity
    if affinity is not None:
        node = affinity.node_affinity
        if node is not None:
            required = node.required_during_scheduling_ignored_during_execution
            total += sum(map(_node_term_chars, required.node_selector_terms)) if required else 0
            total += sum(_node_term_chars(w.preference)
                         for w in node.preferred_during_scheduling_ignored_during_execution or ())
        total += _pod_affinity_chars(affinity.pod_affinity) + _pod_affinity_chars(affinity.pod_anti_affinity)
    return total


def _cel_opt(field: str, expression: str) -> str:
    """CEL: `expression` when the optional `field` (a selection such as x.y) is set, else 0."""
    return f"(has({field}) ? {expression} : 0)"


def _cel_requirements(path: str, var: str) -> str:
    values = _cel_opt(f"{var}.values", f"{var}.values.map(v, v.size()).sum()")
    return _cel_opt(path, f"{path}.map({var}, {var}.key.size() + {values}).sum()")


def _cel_labels(path: str) -> str:
    return _cel_opt(path, f"{path}.map(k, k.size() + {path}[k].size()).sum()")


def _cel_node_term(term: str) -> str:
    return (_cel_requirements(term + ".matchExpressions", "r") + " + "
            + _cel_requirements(term + ".matchFields", "f"))


def _cel_pod_term(term: str) -> str:
    selector = term + ".labelSelector"
    selector_chars = (_cel_labels(selector + ".matchLabels") + " + "
                      + _cel_requirements(selector + ".matchExpressions", "r"))
    keys = [_cel_opt(f"{term}.{name}", f"{term}.{name}.map(k, k.size()).sum()")
            for name in ("matchLabelKeys", "mismatchLabelKeys")]
    return " + ".join([f"{term}.topologyKey.size()", _cel_opt(selector, selector_chars), *keys])


def _cel_terms(path: str, var: str, term_chars: str) -> str:
    """CEL: the sum of `term_chars` (over `var`) across the optional list at `path`."""
    return _cel_opt(path, f"{path}.map({var}, {term_chars}).sum()")


def _cel_pod_affinity(path: str) -> str:
    required = _cel_terms(path + ".requiredDuringSchedulingIgnoredDuringExecution", "t", _cel_pod_term("t"))
    preferred = _cel_terms(path + ".preferredDuringSchedulingIgnoredDuringExecution", "w",
                           _cel_pod_term("w.podAffinityTerm"))
    return _cel_opt(path, f"{required} + {preferred}")


def _cel_pod_text_chars() -> str:
    node = "self.pool.affinity.nodeAffinity"
    required = node + ".requiredDuringSchedulingIgnoredDuringExecution"
    node_chars = " + ".join([
        _cel_opt(required, _cel_terms(required + ".nodeSelectorTerms", "t", _cel_node_term("t"))),
        _cel_terms(node + ".preferredDuringSchedulingIgnoredDuringExecution", "w", _cel_node_term("w.preference")),
    ])
    affinity = " + ".join([_cel_opt(node, node_chars), _cel_pod_affinity("self.pool.affinity.podAffinity"),
                           _cel_pod_affinity("self.pool.affinity.podAntiAffinity")])
    toleration = f"{_cel_opt('t.key', 't.key.size()')} + {_cel_opt('t.value', 't.value.size()')}"
    pool = " + ".join([_cel_labels("self.pool.nodeSelector"), _cel_terms("self.pool.tolerations", "t", toleration),
                       _cel_opt("self.pool.affinity", affinity)])
    env = _cel_terms("self.env", "e", f"e.name.size() + {_cel_opt('e.value', 'e.value.size()')}")
    return f"{env} + {_cel_opt('self.pool', pool)}"


POD_TEXT_CHARS_CEL = _cel_pod_text_chars()
POD_TEXT_RULE = f"{POD_TEXT_CHARS_CEL} <= {POD_TEXT_MAX_CHARS}"

# Without a claim each worker's checkpoints live in its own emptyDir: a checkpoint lands on
# the nodes that write it (rank 0's alone when consolidated), so after a restart the nodes
# hold different checkpoints, or none, and cannot resume together (issue 19). One node has
# no such split, so a one-node run may keep the emptyDir.
SHARED_CHECKPOINT_RULE = "self.nodes.max == 1 || (has(self.checkpointVolume) && has(self.checkpointVolume.claimName))"
SHARED_CHECKPOINT_MESSAGE = ("checkpointVolume.claimName is required when nodes.max > 1: without a claim each "
                             "node's checkpoints live in its own emptyDir, which the other nodes cannot read, so "
                             "a restarted group cannot resume from one checkpoint (a ReadWriteMany claim shared "
                             "by the workers)")


class BloomRunSpec(TrainerConfig):
    """A training run: the trainer's config sections plus where and how to run it."""

    model_config = ConfigDict(
        json_schema_extra=Cel.rules(
            *PARALLEL_RULES,
            (WARMUP_RULE, "optim.warmupTokens must not be longer than the run (training.trainTokens, or "
                          "trainSteps x globalBatchSize x model.seqLength)"),
            (RAMPUP_RULE, "training.rampup.samples must not be longer than the run (training.trainTokens / "
                          "model.seqLength, or trainSteps x globalBatchSize samples)"),
            (NODE_SPAN_RULE, f"nodes.min..nodes.max spans at most {MAX_NODE_COUNTS} node counts"),
            # A messageExpression naming the counts (a filter, map and join over the offsets) is
            # estimated at over 100x the API server's budget: the message names the fields, and
            # bloomctl validate names the counts and batches.
            (WORLD_SIZE_RULE, WORLD_SIZE_MESSAGE),
            (POD_TEXT_RULE, POD_TEXT_MESSAGE),
            (SHARED_CHECKPOINT_RULE, SHARED_CHECKPOINT_MESSAGE),
        )
    )

    checkpoint: RunCheckpointConfig = RunCheckpointConfig()
    """Checkpoint cadence and retention (where checkpoints go is the launcher's choice)."""
    eval: RunEvalConfig | None = None
    """Zero-shot evaluation of the checkpoints, one Kubernetes Job per checkpoint scored (optional)."""

    image: str | None = Field(default=None, min_length=1, max_length=512)
    """Trainer container image; unset: the operator's default (the chart's trainerImage,
    so a private registry is one value of the install)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    """Unset: Always for a tag (a node's cached copy of another team's private image is not
    reused without the registry's say), IfNotPresent for an image pinned by digest."""
    nodes: NodeRange = NodeRange()
    """Worker nodes, elastic between min and max."""
    gpus_per_node: int = Field(default=8, ge=0, le=16)
    """GPUs (and torchrun processes) per worker; 0 runs one CPU process per worker."""
    pool: Pool = Pool()
    """Node pool: selector, tolerations, affinity."""
    resources: ResourceRequirements = ResourceRequirements()
    """CPU, memory and other resources per worker."""
    checkpoint_volume: CheckpointVolume = CheckpointVolume()
    """Volume holding checkpoints."""
    data_volume: DataVolume = DataVolume()
    """Volume holding the training data, mounted read-only (none: the data is in the image)."""
    restart_policy: RestartPolicy = RestartPolicy()
    """When and how often failed workers are replaced."""
    suspend: bool = False
    """Delete the workers (checkpoints stay); false again recreates them and resumes."""
    priority_class_name: DnsSubdomain | None = None
    """PriorityClass of the worker pods."""
    queue: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_SUBDOMAIN_PATTERN)] | None = None
    """Kueue LocalQueue (sets the kueue.x-k8s.io/queue-name label)."""
    budget: Budget = Budget()
    """GPU-hour budget, the unit the paper's ablations were planned in."""
    env: list[EnvVar] = Field(default=[], max_length=64, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})  # the server's twin of _unique_env
    """Extra environment variables of the trainer (names torchrun or the operator set are refused)."""
    shm_size: Quantity | None = None
    """Size limit of the memory-backed /dev/shm (NCCL and data loaders use it); 8Gi by default
    (it counts against the pod's memory, and without a limit a runaway writer takes the node's)."""

    @field_validator("env")
    @classmethod
    def _unique_env(cls, env: list[EnvVar]) -> list[EnvVar]:
        names = [e.name for e in env]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate env names: {', '.join(dupes)}")
        return env

    @model_validator(mode="after")
    def _check_schedule(self) -> "BloomRunSpec":
        # A schedule longer than the run silently never happens: the rate never reaches lr, the
        # batch never reaches globalBatchSize. Only a warmup the manifest gives is checked (the
        # CRD does not store the paper's 375M default, see crd.IMPLICIT_DEFAULTS): small runs
        # that keep the default are the trainer's tests and demos. With trainSteps the run is
        # counted at the full batch, an upper bound under a ramp-up.
        training, optim = self.training, self.optim
        seq_length = self.model.shape().seq_length
        if training.train_tokens is not None:
            run = f"training.trainTokens: {training.train_tokens}"
            run_tokens_ok = lambda tokens: tokens <= training.train_tokens  # noqa: E731
            run_samples = training.train_tokens // seq_length
        else:
            step_tokens = training.global_batch_size * seq_length
            run = (f"training.trainSteps x globalBatchSize x model.seqLength: "
                   f"{training.train_steps} x {training.global_batch_size} x {seq_length}")
            run_tokens_ok = lambda tokens: -(-tokens // step_tokens) <= training.train_steps  # noqa: E731
            run_samples = training.train_steps * training.global_batch_size
        if "warmup_tokens" in optim.model_fields_set and not run_tokens_ok(optim.warmup_tokens):
            raise ValueError(f"optim.warmupTokens ({optim.warmup_tokens}) is longer than the run ({run})")
        if training.rampup is not None and training.rampup.samples > run_samples:
            raise ValueError(f"training.rampup.samples ({training.rampup.samples}) is longer than the run "
                             f"({run_samples} samples; {run})")
        return self

    @model_validator(mode="after")
    def _check_layout(self) -> "BloomRunSpec":
        refusal = layout_refusal(self.parallel.tensor, self.parallel.pipeline, self.gpus_per_node,
                                 self.nodes.min, self.nodes.max)
        if refusal:
            raise ValueError(refusal)
        return self

    @model_validator(mode="after")
    def _check_pod_text(self) -> "BloomRunSpec":
        chars = pod_text_chars(self.env, self.pool)
        if chars > POD_TEXT_MAX_CHARS:
            raise ValueError(f"{POD_TEXT_MESSAGE}; this run has {chars}")
        return self

    @model_validator(mode="after")
    def _check_shared_checkpoints(self) -> "BloomRunSpec":
        if self.nodes.max > 1 and self.checkpoint_volume.claim_name is None:
            raise ValueError(f"{SHARED_CHECKPOINT_MESSAGE}; nodes.max is {self.nodes.max}")
        return self

    @model_validator(mode="after")
    def _check_world_sizes(self) -> "BloomRunSpec":
        nodes = self.nodes
        if nodes.max - nodes.min >= MAX_NODE_COUNTS:
            raise ValueError(f"nodes.min..nodes.max ({nodes.min}..{nodes.max}) spans {nodes.max - nodes.min + 1} "
                             f"node counts, at most {MAX_NODE_COUNTS} are allowed (and no global batch divides "
                             "over more than 18)")
        refusals = world_size_refusals(self)
        if refusals:
            shown = "; ".join(refusals[:4]) + ("; ..." if len(refusals) > 4 else "")
            raise ValueError(f"nodes {nodes.min}-{nodes.max} x {self.gpus_per_node} GPUs, microBatchSize "
                             f"{self.training.micro_batch_size}: {shown} ({WORLD_SIZE_MESSAGE})")
        return self

    def trainer_config(self) -> TrainerConfig:
        """The trainer's sections of this spec, unresolved (bloomrun.trainer.resolve resolves
        them). Already validated as part of the spec, so only copied."""
        sections = {name: getattr(self, name) for name in TrainerConfig.model_fields}
        sections["checkpoint"] = CheckpointConfig.model_construct(
            _fields_set=self.checkpoint.model_fields_set, **dict(self.checkpoint))
        sections["eval"] = self.eval.trainer_section() if self.eval else None
        return TrainerConfig.model_construct(_fields_set=self.model_fields_set & set(sections), **sections)


# ----------------------------------------------------------------------------- status

Phase = Literal["Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]
PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]


class Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Progress(Status):
    """Written by the trainer's rank 0 (bloomrun.trainer.progress), not by the operator."""

    step: int | None = None
    target_steps: int | None = None
    tokens: int | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    checkpoint_step: int | None = None
    """Step of the newest complete checkpoint."""
    checkpoint_time: str | None = None
    """When that checkpoint was published (RFC 3339)."""
    checkpoint_tokens: int | None = None
    """Tokens trained on up to that checkpoint (the operator schedules evaluation by it)."""
    update_time: str | None = None
    """When the trainer last reported."""
    # Where the trainer's time went (bloomrun.trainer.progress.Timing), for goodput.
    start_time: str | None = Field(default=None, max_length=64)
    """When this trainer session (process group) started: a new value is a restart."""
    resumed_step: int | None = Field(default=None, ge=0, le=MAX_STEPS)
    """The checkpoint step this session resumed from (0: the start)."""
    step_seconds: float | None = Field(default=None, ge=0, le=1e12)
    """Rank 0's wall seconds in training steps since startTime."""
    checkpoint_seconds: float | None = Field(default=None, ge=0, le=1e12)
    """Rank 0's wall seconds in checkpoint saves since startTime."""


class GoodputSession(Status):
    """The trainer session last accounted (its totals, to take differences)."""

    start_time: str | None = None
    resumed_step: int | None = None
    step: int | None = None
    step_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    productive: float = 0.0
    """GPU-hours of its steps, moved to `lost` for the steps a restart redoes."""
    restarted: bool = False
    """It follows another session: its time before the first step is restart overhead."""


class Goodput(Status):
    """Where the run's GPU-hours went (bloomrun/operator/goodput.py): workers x GPUs over
    time as in gpuHours (a CPU worker counting as one), plus the evaluation Jobs."""

    productive: float = 0.0
    """In training steps that count."""
    lost: float = 0.0
    """In steps a restart redid (those after the newest checkpoint)."""
    restart: float = 0.0
    """From a failure until the first step again (backoff, replacement, start-up, resume)."""
    checkpoint: float = 0.0
    """In checkpoint saves."""
    evaluation: float = 0.0
    """Of the evaluation Jobs."""
    scheduling: float = 0.0
    """Held by running workers while the run waited for others to be scheduled (Pending)."""
    other: float = 0.0
    """The first start-up and what no report explains."""
    ratio: float | None = None
    """productive / all of the above."""
    display: str = ""
    """The ratio as a percentage, for the printer column."""
    accounted_at: str | None = None
    session: GoodputSession = GoodputSession()


class Condition(Status):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class NodeCounts(Status):
    desired: int = 0
    ready: int = 0
    display: str = "0/0"
    """`ready/desired`, for the printer column."""


class Layout(Status):
    """The parallel layout of the world the running workers form (reconcile.parallel_layout):
    tensor x pipeline x data-parallel ranks, the data-parallel degree following the elastic
    node count."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 0
    """Data-parallel replicas: running workers x ranks per node / (tensor x pipeline); 0 while
    fewer than nodes.min workers run (no world has formed)."""
    display: str = "1x1x0"
    """`tensor x pipeline x data`, for the wide printer column."""


class GpuHours(Status):
    used: float = 0.0
    accounted_at: str | None = None
    """Time up to which `used` is accounted (RFC 3339)."""


class Failure(Status):
    pod: str
    pod_uid: str
    reason: str
    exit_code: int | None = None
    message: str = ""
    time: str


class WorkerRef(Status):
    name: str
    uid: str


class EvalFailure(Status):
    step: int
    job: str
    reason: str
    """The Job's failure reason (BackoffLimitExceeded, PodFailurePolicy, ...) or NoSummary."""
    message: str = ""
    """The evaluation pod's termination message: the error it reported, or its log's last lines."""
    time: str


class Evaluation(Status):
    """Zero-shot evaluation of the run's checkpoints by the operator's Jobs (docs/eval.md)."""

    step: int | None = None
    """Newest checkpoint step scored."""
    tokens: int | None = None
    """Tokens trained on up to that checkpoint."""
    mean: float | None = None
    """Mean accuracy over its tasks (for the printer column)."""
    normalised_mean: float | None = None
    """Mean of (accuracy - random) / (1 - random) over its tasks."""
    mean_stderr: float | None = None
    """Standard error of `mean`, from lm-eval's per-task standard errors (sqrt of their
    squares' sum / tasks); unset when a task has none or the evaluation image predates it.
    A study's best arm is judged against it."""
    tasks: dict[str, float] = {}
    """Accuracy per task at that step."""
    task_stderr: dict[str, float] = {}
    """lm-eval's standard error of each task's accuracy, where the 4 KiB summary had room."""
    scored: int = 0
    """Checkpoints scored."""
    failed: int = 0
    """Evaluation Jobs that failed for good (training is never affected)."""
    last_failure: EvalFailure | None = None
    running: list[int] = []
    """Steps whose Job exists or is being created, outcome not yet recorded."""
    queued: list[int] = []
    """Due steps waiting for a slot (eval.maxConcurrent)."""
    seen_step: int | None = None
    """Newest checkpoint step observed in progress."""
    seen_since_due: int = 0
    """Checkpoints observed since the last one found due (everyCheckpoints counts them)."""
    due_tokens: int | None = None
    """Tokens of the last checkpoint found due (everyTokens compares with it)."""
    message: str = ""
    """Why evaluation is off or waiting, when it is."""


class BloomRunStatus(Status):
    phase: Phase | None = None
    message: str = ""
    observed_generation: int | None = None
    nodes: NodeCounts = NodeCounts()
    layout: Layout = Layout()
    restarts: int = 0
    """Worker replacements after failures (never decreases)."""
    restarts_by_reason: dict[str, int] = {}
    last_failure: Failure | None = None
    handled_failures: list[str] = []
    """UIDs of failed pods already counted, so a retried reconcile never counts one twice."""
    workers: list[WorkerRef] = []
    """Worker pods seen at the last status write and not deleted by the operator: one that is
    later gone without the operator deleting it (by hand, node GC while the operator was
    down) is counted as a restart (PodLost)."""
    backoff_until: str | None = None
    stopping: str | None = None
    """Why the workers are being stopped on purpose (e.g. GPUHourBudgetSpent): not a failure."""
    gpu_hours: GpuHours = GpuHours()
    goodput: Goodput = Goodput()
    progress: Progress = Progress()
    evaluation: Evaluation | None = None
    """Zero-shot evaluation of the checkpoints, when spec.eval is set."""
    conditions: list[Condition] = []
    start_time: str | None = None
    running_time: str | None = None
    """When all desired workers were first Running."""
    completion_time: str | None = None
    infra_hash: str | None = None
    """Hash of the Service/ConfigMap/RBAC last applied."""
    infra_applied_at: str | None = None
    """When they were last applied: a child missing from the watch soon after is not yet seen, not gone."""


# --------------------------------------------------------------------------- resource


MAX_ANNOTATIONS_BYTES = 256 * 1024  # the API server's TotalAnnotationSizeLimitB


class ObjectMeta(BaseModel):
    """metadata as the API server checks it: unknown keys are refused (kubectl's strict field
    validation), labels and annotation keys follow Kubernetes' grammar."""

    model_config = ConfigDict(alias_generator=to_camel, extra="forbid")

    name: str = Field(min_length=1, max_length=MAX_RUN_NAME, pattern=RUN_NAME_PATTERN)
    namespace: Annotated[str, Field(max_length=63, pattern=r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?$")] | None = None
    """Empty or absent: the namespace the manifest is applied to."""
    labels: dict[QualifiedName, LabelValue] = {}
    annotations: dict[str, str] = {}
    # Written by the API server or by controllers: known keys with their types, so an object
    # read back from the cluster parses; what they may hold is the API server's to check.
    generate_name: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    deletion_grace_period_seconds: int | None = None
    owner_references: list[dict[str, Any]] | None = None
    finalizers: list[str] | None = None
    managed_fields: list[dict[str, Any]] | None = None
    self_link: str | None = None

    @field_validator("annotations")
    @classmethod
    def _check_annotations(cls, annotations: dict[str, str]) -> dict[str, str]:
        for key in annotations:
            if not is_qualified_name(key.lower()):
                raise ValueError(f"key {key!r} {QUALIFIED_NAME_MESSAGE}")
        size = sum(len(k) + len(v) for k, v in annotations.items())
        if size > MAX_ANNOTATIONS_BYTES:
            raise ValueError(f"annotations take {size} bytes, at most {MAX_ANNOTATIONS_BYTES} are allowed")
        return annotations


class BloomRun(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    api_version: Literal["bloomrun.io/v1alpha1"]
    kind: Literal["BloomRun"]
    metadata: ObjectMeta
    spec: BloomRunSpec
    status: BloomRunStatus | None = None


class ManifestError(ValueError):
    """A manifest that cannot be a BloomRun; the message is one line naming the field."""


# Limits on what a manifest file may hold, so that pathological input ends in a one-line error
# rather than a RecursionError or an endless expansion of YAML aliases. A BloomRun is about 8
# levels deep and a few hundred values; the API server stores at most etcd's default request
# size (1.5 MiB).
MAX_MANIFEST_BYTES = 3 * 1024 * 1024 // 2
MAX_DEPTH = 64
MAX_VALUES = 100_000


def as_sent(document: Any) -> Any:
    """The document as kubectl sends it to the API server, as JSON: mapping keys are strings
    (YAML's `1:` or `true:` keys become "1" and "true"), a float with an integral value is an
    integer (Go's JSON writes 8.0 as 8), a YAML date is its text. Raises ManifestError naming
    the field for what JSON cannot carry (infinity, NaN, binary) and for documents nested
    deeper than MAX_DEPTH or holding more than MAX_VALUES values."""
    count = 0

    def convert(value: Any, path: str, depth: int) -> Any:
        nonlocal count
        count += 1
        where = path or "(top level)"
        if count > MAX_VALUES:
            raise ManifestError(f"the document holds more than {MAX_VALUES} values")
        if depth > MAX_DEPTH:
            raise ManifestError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            converted = {}
            for key, item in value.items():
                key = _json_key(key, where)
                converted[key] = convert(item, f"{path}.{key}" if path else key, depth + 1)
            return converted
        if isinstance(value, list):
            return [convert(item, f"{path}.{index}", depth + 1) for index, item in enumerate(value)]
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ManifestError(f"{where}: {value} is not a number JSON can carry")
            return int(value) if value.is_integer() else value
        if isinstance(value, (datetime.date, datetime.datetime)):
            return value.isoformat()
        if value is None or isinstance(value, (str, int, bool)):
            return value
        raise ManifestError(f"{where}: a {type(value).__name__} is not a JSON value")

    return convert(document, "", 0)


def _json_key(key: Any, where: str) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    if isinstance(key, int) or (isinstance(key, float) and math.isfinite(key)):
        return str(int(key)) if float(key).is_integer() else repr(key)
    raise ManifestError(f"{where}: a key must be a string, got {type(key).__name__}")


@functools.cache
def _object_schema() -> dict:
    from bloomrun.operator.crd import build_crd  # generated from this module

    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def prune_nulls(document: dict) -> dict:
    """The document with the nulls the API server drops before validating: a null in a field
    (or map value) the schema does not mark nullable means "absent" there (apiextensions'
    PruneNonNullableNullsWithoutDefaults, then defaulting), and so it must offline too. In
    metadata, a native type, a null known field is its zero value, the same as absent."""
    document = copy.deepcopy(document)
    _prune(document, _object_schema())
    metadata = document.get("metadata")
    if isinstance(metadata, dict):
        known = {field.alias for field in ObjectMeta.model_fields.values()}
        for key in [k for k, v in metadata.items() if v is None and k in known]:
            del metadata[key]
        for key in ("labels", "annotations"):  # Go's map[string]string reads null as ""
            if isinstance(metadata.get(key), dict):
                metadata[key] = {k: "" if v is None else v for k, v in metadata[key].items()}
    return document


def _prune(value, schema: dict) -> None:
    if isinstance(value, dict):
        for key in list(value):
            child = schema.get("properties", {}).get(key)
            if child is None and isinstance(schema.get("additionalProperties"), dict):
                child = schema["additionalProperties"]
            if child is None:
                continue
            if value[key] is None and not child.get("nullable"):
                del value[key]
            else:
                _prune(value[key], child)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _prune(item, schema["items"])


def parse_manifest(document: Any) -> BloomRun:
    """Validate a parsed YAML/JSON document as a BloomRun, as strictly as the API server does:
    no type coercion (pydantic's strict mode: "true" is no boolean, true no integer) and
    camelCase keys only (the snake_case spelling is an unknown field there)."""
    if not isinstance(document, dict):
        raise ManifestError(f"a BloomRun manifest is a mapping, got {type(document).__name__}")
    document = prune_nulls(as_sent(document))
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if kind != KIND:
        raise ManifestError(f"kind: expected {KIND!r}, got {kind!r}")
    if api_version != API_VERSION:
        raise ManifestError(f"apiVersion: expected {API_VERSION!r}, got {api_version!r}")
    try:
        return BloomRun.model_validate(document, strict=True, by_alias=True, by_name=False)
    except ValidationError as err:
        # One line, even where a key holds a newline (metadata.annotations."a\n").
        raise ManifestError(format_validation_error(err).replace("\n", "\\n")) from None


class _ManifestLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error. Stricter than
    kubectl on purpose: kubectl v1.37.2 (`create`, `apply`, server-side or not) keeps the last
    value silently, as PyYAML does, so a second `gpusPerNode:` further down changes the run
    without a word (seen on the test cluster; test_validation_cluster)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = (type(key), key) in seen  # 1 and true are different keys to kubectl
                seen.add((type(key), key))
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_document(text: str, source: str) -> Any:
    """The one YAML document of a manifest's text, read by the manifests' rule (duplicate keys
    refused, size bounded); errors name `source`. BloomRun and BloomStudy both read this way."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{source}: {len(text)} bytes, larger than the {MAX_MANIFEST_BYTES} "
                            "a Kubernetes object may have")
    try:
        documents = [d for d in yaml.load_all(text, Loader=_ManifestLoader) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ManifestError(f"{source}:{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise ManifestError(f"{source}: invalid YAML: nested too deeply") from None
    if len(documents) != 1:
        raise ManifestError(f"{source}: expected one YAML document, found {len(documents)}")
    return documents[0]


def read_manifest_file(path: str | Path) -> str:
    """A manifest file's text; a missing, unreadable or oversized file is a ManifestError."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: {path.stat().st_size} bytes, larger than the {MAX_MANIFEST_BYTES} "
                                "a Kubernetes object may have")
        return path.read_text()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot read: {err}") from None


def load_manifest_text(text: str, source: str) -> BloomRun:
    """Validate the text of a manifest (one YAML document); errors name `source`."""
    document = read_document(text, source)
    try:
        return parse_manifest(document)
    except ManifestError as err:
        raise ManifestError(f"{source}: {err}") from None


def load_manifest(path: str | Path) -> BloomRun:
    """Read and validate a BloomRun manifest file (one YAML document)."""
    return load_manifest_text(read_manifest_file(path), str(path))
