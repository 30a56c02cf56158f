"""What should exist for a BloomRun: pure builders from the validated spec to manifests.

No API calls here (kube.py does those) and no decisions about *when* (reconcile.py):
every function maps a `Run` to Kubernetes objects, so tests check them without a cluster.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Callable

from bloomrun.operator.spec import API_VERSION, DEFAULT_IMAGE, GROUP, KIND, PLURAL, BloomRunSpec, ManifestError
from bloomrun.trainer import elastic
from bloomrun.trainer.config import TrainerConfig
from bloomrun.trainer.resolve import config_yaml, resolve_config

OPERATOR = "bloomrun-operator"
RUN_LABEL = "bloomrun.io/run"
INDEX_LABEL = "bloomrun.io/worker-index"
HASH_LABEL = "bloomrun.io/template-hash"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# On every pod of a run's network, workers and rendezvous store alike: the headless
# Service's and the NetworkPolicy's selector. The store pod does not carry RUN_LABEL, which
# marks the run's workers (the operator's pod index, `kubectl get pods -l bloomrun.io/run=R`).
MEMBER_LABEL = "bloomrun.io/member-of"
MANAGED_BY = "app.kubernetes.io/managed-by"

RDZV_PORT = 29400
CONFIG_DIR = "/etc/bloomrun"
CONFIG_FILE = "config.yaml"
# In-pod restarts torchrun tries after a worker process fails before the pod itself fails
# and the operator's restart policy takes over (membership changes do not count).
TORCHRUN_MAX_RESTARTS = 3
RUN_AS_USER = 1000
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class Run:
    """A BloomRun as the builders see it: identity plus the validated spec."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: BloomRunSpec
    default_image: str = DEFAULT_IMAGE
    """The trainer image when the spec names none: the operator's --trainer-image."""

    @property
    def image(self) -> str:
        return self.spec.image or self.default_image

    @classmethod
    def from_body(cls, body: dict, default_image: str = DEFAULT_IMAGE) -> "Run":
        """Raises ManifestError when the stored spec fails the pydantic checks."""
        from bloomrun.operator.spec import parse_manifest

        meta = body["metadata"]
        document = {k: body[k] for k in ("apiVersion", "kind", "spec") if k in body}
        document["metadata"] = {"name": meta["name"], "namespace": meta.get("namespace")}
        run = parse_manifest(document)
        return cls(meta["name"], meta["namespace"], meta.get("uid", ""), meta.get("generation", 1), run.spec,
                   default_image)


# ------------------------------------------------------------------------------ names


def _dns_label(name: str) -> str:
    assert len(name) <= 63, f"child name {name!r} is longer than a DNS label"
    return name


def worker_name(run: Run, index: int) -> str:
    return _dns_label(f"{run.name}-worker-{index}")


def service_name(run: Run) -> str:
    return _dns_label(run.name)


def config_map_name(run: Run) -> str:
    return _dns_label(f"{run.name}-config")


def service_account_name(run: Run) -> str:
    return _dns_label(f"{run.name}-trainer")


def rendezvous_store_name(run: Run) -> str:
    return _dns_label(f"{run.name}-rendezvous")


def rendezvous_endpoint(run: Run) -> str:
    """The rendezvous store pod's stable DNS name under the headless Service (its hostname
    and subdomain): no worker hosts the store, so losing any one of them, worker-0
    included, leaves the others to re-form (bloomrun/trainer/rendezvous_store.py)."""
    return f"{rendezvous_store_name(run)}.{service_name(run)}.{run.namespace}.svc:{RDZV_PORT}"


def labels(run: Run, component: str) -> dict[str, str]:
    """The labels every child carries (the queue label is the workers' alone: worker_labels)."""
    return {
        "app.kubernetes.io/name": "bloomrun",
        "app.kubernetes.io/instance": run.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "bloomrun",
        MANAGED_BY: OPERATOR,
        RUN_LABEL: run.name,
    }


def worker_labels(run: Run, index: int) -> dict[str, str]:
    """A worker's own labels. The Kueue queue goes on the pods only: Kueue admits pods, and
    on the ConfigMap, Service and RBAC objects the label named a queue nothing admits."""
    result = {INDEX_LABEL: str(index), HASH_LABEL: template_hash(run), MEMBER_LABEL: run.name}
    if run.spec.queue:
        result[QUEUE_LABEL] = run.spec.queue
    return result


def owner_reference(run: Run) -> dict:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": run.name, "uid": run.uid,
            "controller": True, "blockOwnerDeletion": True}


def _metadata(run: Run, name: str, component: str, **extra_labels: str) -> dict:
    return {"name": name, "namespace": run.namespace, "labels": labels(run, component) | extra_labels,
            "ownerReferences": [owner_reference(run)]}


# ---------------------------------------------------------------------- infrastructure


def run_checkpoint_dir(run: Run) -> PurePosixPath:
    """The run's own folder on the checkpoint volume: <mount>/<namespace>/<name>/<uid>.

    Runs share a claim (the paper's arms do: examples/ablation-1b3-alibi.yaml), so each
    gets a folder by identity, and the trainer also checks the identity each checkpoint
    records (bloomrun.trainer.identity). The uid is part of the path so that a run deleted
    and re-created under the same name starts fresh, next to the old run's checkpoints,
    which stay on the volume untouched; `checkpoint.initFrom.run` starts from them."""
    return PurePosixPath(run.spec.checkpoint_volume.mount_path) / run.namespace / run.name / run.uid


def pod_trainer_config(run: Run) -> TrainerConfig:
    """The config the pods read: relative data paths are inside the data volume (where the
    pod sees its data, whatever its working directory), checkpoints go to the run's own
    folder on their volume, beside the other runs' folders a warm start may name."""
    spec = run.spec
    folder = run_checkpoint_dir(run)
    # Without the eval section: the evaluation Jobs get theirs on the command line, so a change
    # to it never changes the workers' template (which would restart training).
    config = spec.trainer_config().model_copy(update={"eval": None})
    return resolve_config(config, base_dir=spec.data_volume.mount_path,
                          checkpoint_dir=folder, runs_root=folder.parent.parent)


def desired_config_map(run: Run) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(run, config_map_name(run), "config"),
            "data": {CONFIG_FILE: config_yaml(pod_trainer_config(run))}}


def desired_service(run: Run) -> dict:
    """Headless: gives each worker a stable DNS name for the rendezvous and NCCL."""
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _metadata(run, service_name(run), "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "selector": {MEMBER_LABEL: run.name, MANAGED_BY: OPERATOR},
            # The rendezvous host must resolve before its peers are Ready.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT}],
        },
    }


# Namespaces whose pods may scrape a run's metrics port (label your Prometheus' namespace).
SCRAPER_NAMESPACE_LABEL = "bloomrun.io/metrics-scraper"


def network_policy_name(run: Run) -> str:
    return _dns_label(f"{run.name}-workers")


def desired_network_policy(run: Run) -> dict:
    """Only the run's own workers reach its workers, on any port; Prometheus on the metrics
    port. The c10d rendezvous store has no authentication and torchrun's agent unpickles
    what it reads back from it (a planted value ran code in a local trial against torch
    2.15, issue 20), and NCCL and torchrun's per-job store listen on ports picked at run
    time, so the rule is by peer, not by port. Enforced where the cluster's network plugin
    enforces NetworkPolicy; docs/operator.md says what it assumes."""
    own = {"podSelector": {"matchLabels": {MEMBER_LABEL: run.name, MANAGED_BY: OPERATOR}}}
    ingress: list[dict] = [{"from": [own]}]
    if run.spec.metrics.port:
        ingress.append({"from": [{"namespaceSelector": {"matchLabels": {SCRAPER_NAMESPACE_LABEL: "true"}}}],
                        "ports": [{"protocol": "TCP", "port": run.spec.metrics.port}]})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _metadata(run, network_policy_name(run), "network-policy"),
        "spec": {"podSelector": own["podSelector"], "policyTypes": ["Ingress"], "ingress": ingress},
    }


STORE_COMPONENT = "rendezvous-store"


def desired_rendezvous_store(run: Run) -> dict:
    """The run's c10d store in a pod of its own, recreated by its Deployment if it dies (the
    agents then re-form; rendezvous state is rewritten every round). Placed on the run's
    pool (a cluster may have no untainted node), small, no GPU, no API token."""
    selector = {MEMBER_LABEL: run.name, MANAGED_BY: OPERATOR, "app.kubernetes.io/component": STORE_COMPONENT}
    container = {
        "name": "store", "image": run.image, "imagePullPolicy": image_pull_policy(run),
        "command": ["python", "-m", "bloomrun.trainer.rendezvous_store", f"--port={RDZV_PORT}"],
        "ports": [{"name": "rdzv", "containerPort": RDZV_PORT}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": restricted_security_context(),
        "volumeMounts": [scratch_volume()[1]],
    }
    pod_spec = {
        "hostname": rendezvous_store_name(run), "subdomain": service_name(run),
        "automountServiceAccountToken": False, "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "nodeSelector": dict(run.spec.pool.node_selector), "tolerations": store_tolerations(run),
        "containers": [container],
        "volumes": [scratch_volume()[0]],
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _metadata(run, rendezvous_store_name(run), STORE_COMPONENT),
        "spec": {
            "replicas": 1, "strategy": {"type": "Recreate"},  # never two stores for one run
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": selector | {"app.kubernetes.io/part-of": "bloomrun"}},
                         "spec": pod_spec},
        },
    }


def desired_rbac(run: Run) -> list[dict]:
    """The trainer's identity: it may read and patch its own run's status, nothing else."""
    account = service_account_name(run)
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": _metadata(run, account, "trainer-rbac"),
        "rules": [{"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"],
                   "resourceNames": [run.name], "verbs": ["get", "patch"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": _metadata(run, account, "trainer-rbac"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": run.namespace}],
    }
    service_account = {"apiVersion": "v1", "kind": "ServiceAccount",
                       "metadata": _metadata(run, account, "trainer-rbac")}
    return [service_account, role, binding]


def desired_infra(run: Run) -> list[dict]:
    """Every child but the worker pods, in the order they should be applied."""
    return [*desired_rbac(run), desired_config_map(run), desired_service(run), desired_network_policy(run),
            desired_rendezvous_store(run)]


@dataclass(frozen=True)
class ChildKind:
    """A kind of object a run owns. CHILD_KINDS is the one list of them: the API paths
    (kube.PATHS), the watches (main.register) and `infra_names` all read it."""

    kind: str
    api_version: str
    plural: str
    name: Callable[[Run], str] | None = None  # the run's one object of this kind; None: one per worker


INFRA_KINDS = (
    ChildKind("ServiceAccount", "v1", "serviceaccounts", service_account_name),
    ChildKind("Role", "rbac.authorization.k8s.io/v1", "roles", service_account_name),
    ChildKind("RoleBinding", "rbac.authorization.k8s.io/v1", "rolebindings", service_account_name),
    ChildKind("ConfigMap", "v1", "configmaps", config_map_name),
    ChildKind("Service", "v1", "services", service_name),
    ChildKind("NetworkPolicy", "networking.k8s.io/v1", "networkpolicies", network_policy_name),
    ChildKind("Deployment", "apps/v1", "deployments", rendezvous_store_name),
)
WORKER_KIND = ChildKind("Pod", "v1", "pods")
CHILD_KINDS = (*INFRA_KINDS, WORKER_KIND)


def infra_names(run: Run) -> set[tuple[str, str]]:
    """(kind, name) of each object `desired_infra` builds, without building them (every
    reconcile compares these with what the watches observe)."""
    return {(child.kind, child.name(run)) for child in INFRA_KINDS}


def content_hash(objects: Any) -> str:
    return hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- workers


def torchrun_launch(run: Run) -> elastic.Launch:
    spec = run.spec
    # Never the default id: jobs sharing an endpoint would share rendezvous state.
    rendezvous = elastic.Rendezvous(rendezvous_endpoint(run), run.uid, nnodes=f"{spec.nodes.min}:{spec.nodes.max}",
                                    is_host=False)  # the store pod hosts it
    return elastic.Launch(f"{CONFIG_DIR}/{CONFIG_FILE}", rendezvous, nproc=max(spec.gpus_per_node, 1),
                          max_restarts=TORCHRUN_MAX_RESTARTS)


def torchrun_command(run: Run) -> list[str]:
    return elastic.build_torchrun_command(torchrun_launch(run))


def worker_env(run: Run) -> list[dict]:
    """torchrun's variables (bloomrun.trainer.elastic), the run's identity (the trainer
    reports progress to this run's status with it), then the user's."""
    operator_env = elastic.build_env() | {
        "BLOOMRUN_RUN_NAME": run.name,
        "BLOOMRUN_RUN_NAMESPACE": run.namespace,
        "BLOOMRUN_RUN_UID": run.uid,
        # The root filesystem is read-only: caches that default to HOME (torch, Triton,
        # DeepSpeed) go to the scratch volume.
        "HOME": SCRATCH_DIR,
    }
    user_names = {e.name for e in run.spec.env}
    return [{"name": k, "value": v} for k, v in operator_env.items() if k not in user_names] + [
        {"name": e.name, "value": e.value} for e in run.spec.env
    ]


def worker_tolerations(run: Run) -> list[dict]:
    return pool_tolerations(run.spec.pool, run.spec.gpus_per_node)


# The store's Deployment replaces its pod only once it is evicted from a lost node, by default
# 300 s after the node goes NotReady (DefaultTolerationSeconds): no agent can re-form a group
# meanwhile. Seen on the real nodes: losing the store's node stopped the survivor for minutes.
STORE_EVICTION_S = 10


def store_tolerations(run: Run) -> list[dict]:
    return worker_tolerations(run) + [
        {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": STORE_EVICTION_S}
        for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")]


def pool_tolerations(pool, gpus: int) -> list[dict]:
    """A pool's tolerations, plus the GPU taint's for a pod that uses GPUs."""
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in pool.tolerations]
    if gpus and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        # GPU pools carry this taint so CPU pods stay off them; a GPU worker belongs there.
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def worker_resources(run: Run) -> dict:
    limits = dict(run.spec.resources.limits)
    requests = dict(run.spec.resources.requests)
    if run.spec.gpus_per_node:
        limits[GPU_RESOURCE] = str(run.spec.gpus_per_node)
    result = {}
    if requests:
        result["requests"] = requests
    if limits:
        result["limits"] = limits
    return result


def _checkpoint_volume(run: Run) -> dict:
    claim = run.spec.checkpoint_volume.claim_name
    source = {"persistentVolumeClaim": {"claimName": claim}} if claim else {"emptyDir": {}}
    return {"name": "checkpoints", **source}


DEFAULT_SHM_SIZE = "8Gi"
SCRATCH_DIR = "/tmp"  # the one writable folder of the image's filesystem: caches, HOME


def restricted_security_context() -> dict:
    """What Pod Security's `restricted` level demands of a container, and a read-only root
    filesystem (a compromised trainer cannot change the image's code for its successors in
    the pod; what must be written goes to the scratch volume or the checkpoint volume)."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}, "readOnlyRootFilesystem": True}


def pod_security_context() -> dict:
    """The pod-level half: the image's non-root user (its home and the volumes it writes are
    group-owned by it through fsGroup)."""
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}}


def image_pull_policy(run: Run) -> str:
    return run.spec.image_pull_policy or ("IfNotPresent" if "@sha256:" in run.image else "Always")


def scratch_volume() -> tuple[dict, dict]:
    """(volume, mount) of the writable /tmp that the read-only root needs."""
    return {"name": "scratch", "emptyDir": {"sizeLimit": "4Gi"}}, {"name": "scratch", "mountPath": SCRATCH_DIR}


def worker_pod_spec(run: Run) -> dict:
    """The pod spec shared by all workers of a run (the hostname is added per worker)."""
    spec = run.spec
    shm = {"medium": "Memory", "sizeLimit": spec.shm_size or DEFAULT_SHM_SIZE}
    scratch, scratch_mount = scratch_volume()
    container = {
        "name": "trainer",
        "image": run.image,
        "imagePullPolicy": image_pull_policy(run),
        "command": torchrun_command(run),
        "env": worker_env(run),
        "ports": [{"name": "rdzv", "containerPort": RDZV_PORT},
                  {"name": "metrics", "containerPort": spec.metrics.port}],
        "resources": worker_resources(run),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "checkpoints", "mountPath": spec.checkpoint_volume.mount_path},
            {"name": "dshm", "mountPath": "/dev/shm"},
            scratch_mount,
        ],
        "securityContext": restricted_security_context(),
        # The trainer writes why it stopped to /dev/termination-log (a refused checkpoint,
        # a bad data file); without that file, the log's last lines are the message. The
        # operator puts it into status.lastFailure.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.data_volume.claim_name:
        container["volumeMounts"].append({"name": "data", "mountPath": spec.data_volume.mount_path, "readOnly": True})
    if spec.metrics.port == 0:
        container["ports"] = container["ports"][:1]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the operator replaces failed workers, with backoff and a count
        "subdomain": service_name(run),
        "serviceAccountName": service_account_name(run),
        # torchrun's --shutdown-timeout is derived from it (bloomrun.trainer.elastic).
        "terminationGracePeriodSeconds": elastic.GRACE_PERIOD_S,
        "securityContext": pod_security_context(),
        "nodeSelector": dict(spec.pool.node_selector),
        "tolerations": worker_tolerations(run),
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(run)}},
            _checkpoint_volume(run),
            {"name": "dshm", "emptyDir": shm},
            scratch,
        ],
    }
    if spec.data_volume.claim_name:
        pod_spec["volumes"].append(
            {"name": "data", "persistentVolumeClaim": {"claimName": spec.data_volume.claim_name, "readOnly": True}})
    if spec.pool.affinity:
        pod_spec["affinity"] = spec.pool.manifest_affinity()
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    return pod_spec


_HASHES: dict[tuple[str, str], str] = {}


def _memoised(kind: str, run: Run, compute) -> str:
    # Every reconcile asks and the answer changes only with the spec: keyed on the run's
    # identity and spec, so these stay pure functions of `run`.
    key = (kind, f"{run.namespace}/{run.name}/{run.uid}/{run.spec.model_dump_json()}")
    if key not in _HASHES:
        if len(_HASHES) > 4096:
            _HASHES.clear()
        _HASHES[key] = compute()
    return _HASHES[key]


def template_hash(run: Run) -> str:
    """Changes exactly when the workers must be recreated to pick up a spec change."""
    return _memoised("template", run, lambda: content_hash([worker_pod_spec(run), desired_config_map(run)["data"]]))


def infra_hash(run: Run) -> str:
    """Changes exactly when the Service, ConfigMap or RBAC must be applied again."""
    return _memoised("infra", run, lambda: content_hash(desired_infra(run)))


def desired_worker(run: Run, index: int) -> dict:
    pod_spec = worker_pod_spec(run) | {"hostname": worker_name(run, index)}
    metadata = _metadata(run, worker_name(run, index), "worker", **worker_labels(run, index))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


__all__ = [
    "Run", "ManifestError", "desired_infra", "desired_worker", "template_hash", "worker_name",
    "content_hash", "torchrun_command", "rendezvous_endpoint",
]
