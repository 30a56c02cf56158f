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

from bloomrun.trainer.config import PRESETS, CheckpointConfig, Section, TrainerConfig, format_validation_error

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
    def rules(*rules: tuple[str, str]) -> dict:
        return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


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


class Pool(Section):
    """Where the workers may run: a GPU node pool."""

    node_selector: LabelMap = Field(default={}, json_schema_extra=keys_rule("nodeSelector"))
    """Node labels a worker's node must carry (e.g. nvidia.com/gpu.product)."""
    tolerations: list[Toleration] = Field(default=[], max_length=32)
    """Taints the workers tolerate; the nvidia.com/gpu taint is tolerated automatically."""
    affinity: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    )
    """A Kubernetes Pod affinity, passed through unchanged."""


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
    """PersistentVolumeClaim holding checkpoints (ReadWriteMany across nodes); without one
    checkpoints live in an emptyDir and do not survive a pod's replacement."""
    mount_path: str = Field(default=DEFAULT_CHECKPOINT_MOUNT, pattern=r"^/[^:]*$", max_length=255)
    """Where the volume is mounted; the operator sets the trainer's checkpoint.dir to it."""


class DataVolume(Section):
    claim_name: DnsSubdomain | None = None
    """PersistentVolumeClaim holding the pretokenized corpora (data.sources paths point into it)."""
    mount_path: str = Field(default="/data", pattern=r"^/[^:]*$", max_length=255)
    """Where it is mounted (read-only); in a pod, relative data paths are relative to it."""


class RestartPolicy(Section):
    max_restarts: int = Field(default=10, ge=0, le=10_000)
    """Worker replacements allowed before the run is marked Failed."""
    backoff_seconds: int = Field(default=10, ge=0, le=3600)
    """Wait before the first replacement; doubles with each further restart (capped at 10 min)."""
    retryable_exit_codes: list[Annotated[int, Field(ge=1, le=255)]] = Field(
        default=DEFAULT_RETRYABLE_EXIT_CODES, max_length=255
    )
    """Exit codes that restart the worker; any other non-zero code fails the run."""


class Budget(Section):
    gpu_hours: float | None = Field(default=None, gt=0, le=1e9)
    """GPU-hours (nodes x GPUs x running time) after which the run checkpoints and stops."""


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


class BloomRunSpec(TrainerConfig):
    """A training run: the trainer's config sections plus where and how to run it."""

    model_config = ConfigDict(
        json_schema_extra=Cel.rules(
            (WARMUP_RULE, "optim.warmupTokens must not be longer than the run (training.trainTokens, or "
                          "trainSteps x globalBatchSize x model.seqLength)"),
            (RAMPUP_RULE, "training.rampup.samples must not be longer than the run (training.trainTokens / "
                          "model.seqLength, or trainSteps x globalBatchSize samples)"),
        )
    )

    checkpoint: RunCheckpointConfig = RunCheckpointConfig()
    """Checkpoint cadence and retention (where checkpoints go is the launcher's choice)."""

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

    def trainer_config(self) -> TrainerConfig:
        """The trainer's sections of this spec, unresolved (bloomrun.trainer.resolve resolves
        them). Already validated as part of the spec, so only copied."""
        sections = {name: getattr(self, name) for name in TrainerConfig.model_fields}
        sections["checkpoint"] = CheckpointConfig.model_construct(
            _fields_set=self.checkpoint.model_fields_set, **dict(self.checkpoint))
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
    update_time: str | None = None
    """When the trainer last reported."""


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


class BloomRunStatus(Status):
    phase: Phase | None = None
    message: str = ""
    observed_generation: int | None = None
    nodes: NodeCounts = NodeCounts()
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
    progress: Progress = Progress()
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


def load_manifest_text(text: str, source: str) -> BloomRun:
    """Validate the text of a manifest (one YAML document); errors name `source`."""
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
    try:
        return parse_manifest(documents[0])
    except ManifestError as err:
        raise ManifestError(f"{source}: {err}") from None


def load_manifest(path: str | Path) -> BloomRun:
    """Read and validate a BloomRun manifest file (one YAML document)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: {path.stat().st_size} bytes, larger than the {MAX_MANIFEST_BYTES} "
                                "a Kubernetes object may have")
        text = path.read_text()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot read: {err}") from None
    return load_manifest_text(text, str(path))
