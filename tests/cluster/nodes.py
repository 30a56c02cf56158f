"""Node pools as real GPU clusters label them, and the kwok-managed Node objects for them.

Labels follow NVIDIA's GPU feature discovery (`nvidia.com/gpu.*`); the taint is the one
GPU clusters put on accelerator nodes so that only pods tolerating it land there. Sizes are
those of the cloud machines these pools stand for (p4de/p4d: 8 x A100 SXM4, 96 vCPU,
1152 GiB), less a little kept back for the system, as a kubelet would report.
"""

from dataclasses import dataclass, field

KWOK_ANNOTATION = "kwok.x-k8s.io/node"  # kwok manages exactly the nodes carrying it
POOL_LABEL = "bloomrun.io/pool"
GPU = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU, "value": "present", "effect": "NoSchedule"}


@dataclass(frozen=True)
class Pool:
    name: str
    capacity: dict[str, str]
    allocatable: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[dict, ...] = ()
    initial_nodes: int = 2

    @property
    def selector(self) -> dict[str, str]:
        """The nodeSelector that picks this pool."""
        return {POOL_LABEL: self.name}

    @property
    def tolerations(self) -> list[dict]:
        """The tolerations a pod needs to land on this pool."""
        return [{"key": t["key"], "operator": "Exists", "effect": t["effect"]}
                for t in self.taints]


def _a100_pool(name: str, product: str, gpu_memory_mib: int, instance: str, nodes: int):
    return Pool(
        name=name,
        capacity={"cpu": "96", "memory": "1152Gi", "pods": "110",
                  "ephemeral-storage": "7500Gi", GPU: "8"},
        allocatable={"cpu": "95", "memory": "1120Gi", "pods": "110",
                     "ephemeral-storage": "7000Gi", GPU: "8"},
        labels={
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": product,
            "nvidia.com/gpu.count": "8",
            "nvidia.com/gpu.memory": str(gpu_memory_mib),
            "node.kubernetes.io/instance-type": instance,
        },
        taints=(GPU_TAINT,),
        initial_nodes=nodes,
    )


POOLS: dict[str, Pool] = {
    "a100-80gb": _a100_pool("a100-80gb", "NVIDIA-A100-SXM4-80GB", 81920, "p4de.24xlarge", 4),
    "a100-40gb": _a100_pool("a100-40gb", "NVIDIA-A100-SXM4-40GB", 40960, "p4d.24xlarge", 2),
    "cpu": Pool(
        name="cpu",
        capacity={"cpu": "32", "memory": "128Gi", "pods": "110",
                  "ephemeral-storage": "500Gi"},
        allocatable={"cpu": "31", "memory": "120Gi", "pods": "110",
                     "ephemeral-storage": "450Gi"},
        labels={"node.kubernetes.io/instance-type": "m6i.8xlarge"},
        initial_nodes=2,
    ),
}


def node_manifest(name: str, pool: Pool) -> dict:
    """A Node for kwok to run: pool labels, taints, and the capacity it advertises."""
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        POOL_LABEL: pool.name,
        **pool.labels,
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": [dict(t) for t in pool.taints]},
        "status": {
            "capacity": dict(pool.capacity),
            "allocatable": dict(pool.allocatable),
        },
    }


def initial_nodes() -> list[tuple[str, Pool]]:
    return [(f"{pool.name}-{i}", pool) for pool in POOLS.values()
            for i in range(pool.initial_nodes)]


def schedulable(node) -> bool:
    """Ready, with the not-ready taint every node is created with lifted by the node
    lifecycle controller (`node` as the kubernetes client's V1Node)."""
    condition_ready = any(c.type == "Ready" and c.status == "True"
                          for c in (node.status.conditions or []))
    return condition_ready and not any(t.key.startswith("node.kubernetes.io/")
                                       for t in node.spec.taints or [])
