"""The BloomRun resource: spec and status as pydantic models.

One source of truth: `BloomRunSpec` *is* the trainer's `TrainerConfig` plus the cluster's
fields, so the trainer, `bloomctl run`, `bloomctl validate`, the operator and the CRD
(generated from these models by `bloomrun.operator.crd`) cannot disagree about a field.

Importable without kopf or the Kubernetes client: `bloomctl validate` and the trainer's
helpers use it on machines that have neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
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

from bloomrun.trainer.config import CheckpointConfig, Section, TrainerConfig, format_validation_error

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

QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


def _quantity_to_str(value: Any) -> Any:
    # Kubernetes quantities may be written as numbers in YAML (`cpu: 4`).
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    Field(pattern=QUANTITY_PATTERN, max_length=64),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string", "pattern": QUANTITY_PATTERN, "maxLength": 64}],
        }
    ),
]

LabelMap = Annotated[
    dict[Annotated[str, Field(max_length=317)], Annotated[str, Field(max_length=63)]],
    Field(max_length=64),
]


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
    key: str | None = Field(default=None, max_length=317)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)


class Pool(Section):
    """Where the workers may run: a GPU node pool."""

    node_selector: LabelMap = {}
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

    requests: dict[Annotated[str, Field(max_length=253)], Quantity] = Field(default={}, max_length=16)
    limits: dict[Annotated[str, Field(max_length=253)], Quantity] = Field(default={}, max_length=16)

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
    claim_name: str | None = Field(default=None, max_length=253)
    """PersistentVolumeClaim holding checkpoints (ReadWriteMany across nodes); without one
    checkpoints live in an emptyDir and do not survive a pod's replacement."""
    mount_path: str = Field(default=DEFAULT_CHECKPOINT_MOUNT, pattern=r"^/[^:]*$", max_length=255)
    """Where the volume is mounted; the operator sets the trainer's checkpoint.dir to it."""


class DataVolume(Section):
    claim_name: str | None = Field(default=None, max_length=253)
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
    gpu_hours: float | None = Field(default=None, gt=0)
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


class BloomRunSpec(TrainerConfig):
    """A training run: the trainer's config sections plus where and how to run it."""

    checkpoint: RunCheckpointConfig = RunCheckpointConfig()
    """Checkpoint cadence and retention (where checkpoints go is the launcher's choice)."""

    image: str = Field(default=DEFAULT_IMAGE, min_length=1, max_length=512)
    """Trainer container image."""
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
    priority_class_name: str | None = Field(default=None, max_length=253)
    """PriorityClass of the worker pods."""
    queue: str | None = Field(default=None, max_length=63)
    """Kueue LocalQueue (sets the kueue.x-k8s.io/queue-name label)."""
    budget: Budget = Budget()
    """GPU-hour budget, the unit the paper's ablations were planned in."""
    env: list[EnvVar] = Field(default=[], max_length=64)
    """Extra environment variables of the trainer (names torchrun or the operator set are refused)."""
    shm_size: Quantity | None = None
    """Size limit of the memory-backed /dev/shm (NCCL and data loaders use it); none by default."""

    @field_validator("env")
    @classmethod
    def _unique_env(cls, env: list[EnvVar]) -> list[EnvVar]:
        names = [e.name for e in env]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate env names: {', '.join(dupes)}")
        return env

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


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=MAX_RUN_NAME, pattern=RUN_NAME_PATTERN)
    namespace: str | None = Field(default=None, max_length=63)
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class BloomRun(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    api_version: Literal["bloomrun.io/v1alpha1"]
    kind: Literal["BloomRun"]
    metadata: ObjectMeta
    spec: BloomRunSpec
    status: BloomRunStatus | None = None


class ManifestError(ValueError):
    """A manifest that cannot be a BloomRun; the message is one line naming the field."""


def parse_manifest(document: Any) -> BloomRun:
    """Validate a parsed YAML/JSON document as a BloomRun."""
    if not isinstance(document, dict):
        raise ManifestError(f"a BloomRun manifest is a mapping, got {type(document).__name__}")
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if kind != KIND:
        raise ManifestError(f"kind: expected {KIND!r}, got {kind!r}")
    if api_version != API_VERSION:
        raise ManifestError(f"apiVersion: expected {API_VERSION!r}, got {api_version!r}")
    try:
        return BloomRun.model_validate(document)
    except ValidationError as err:
        raise ManifestError(format_validation_error(err)) from None


def load_manifest(path: str | Path) -> BloomRun:
    """Read and validate a BloomRun manifest file (one YAML document)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot read: {err}") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ManifestError(f"{path}:{where}: invalid YAML: {problem}") from None
    if len(documents) != 1:
        raise ManifestError(f"{path}: expected one YAML document, found {len(documents)}")
    try:
        return parse_manifest(documents[0])
    except ManifestError as err:
        raise ManifestError(f"{path}: {err}") from None
