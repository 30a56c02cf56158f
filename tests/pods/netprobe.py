"""The network probe of the `pods` tests (tools/k8s/netpol/netprobe): pods that serve their
name on ports, and a TCP dial from inside one pod to an address, which tells a connection a
NetworkPolicy dropped from one it let through."""

from __future__ import annotations

from kubernetes import client

NETPROBE_IMAGE = "bloomrun.local/netprobe:1"
BLOCKED_AFTER_S = 2  # a dial the policy drops times out; an allowed one answers at once
DROPPED = "dropped"  # no connection within BLOCKED_AFTER_S
SILENT = "connected"  # the connection opened; the server said nothing (one that waits for a request)
REFUSED = "refused"  # nothing listens there (yet)
UNREACHABLE = "unreachable"  # "no route to host": no one holds the address, or an ICMP refusal


def probe_pod(name: str, labels: dict, node: str, nodes, ports: list[int]) -> dict:
    """A pod on real node `node` that answers "NAME PORT" on each of `ports`."""
    return {"metadata": {"name": name, "labels": labels}, "spec": {
        "nodeName": node, "nodeSelector": nodes.selector, "tolerations": nodes.tolerations,
        "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "probe", "image": NETPROBE_IMAGE, "imagePullPolicy": "Never",
                        "args": ["serve", name, *map(str, ports)],
                        "securityContext": {"allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"]},
                                            "runAsNonRoot": True, "runAsUser": 10001,
                                            "seccompProfile": {"type": "RuntimeDefault"}}}]}}


def dial(cluster, namespace: str, pod: str, address: str) -> str:
    """What a dial from inside `pod` to `address` (ip:port) met: the server's first line,
    SILENT, REFUSED, UNREACHABLE or DROPPED."""
    out = cluster.kubectl("exec", "-n", namespace, pod, "--", "/netprobe", "dial", address,
                          str(BLOCKED_AFTER_S), check=False)
    if out.returncode == 0:
        return out.stdout.strip()
    if "connection refused" in out.stdout:
        return REFUSED
    if "no route to host" in out.stdout:
        return UNREACHABLE
    assert "i/o timeout" in out.stdout, out.stdout + out.stderr
    return SILENT if "netprobe: read from" in out.stdout else DROPPED


class Pods:
    """The test's probe pods by name: (namespace, IP), and a dial from one to another's port."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.where: dict[str, tuple[str, str]] = {}

    def start(self, namespace: str, spec: dict) -> None:
        core = client.CoreV1Api(self.cluster.api())
        core.create_namespaced_pod(namespace, spec)
        self.where[spec["metadata"]["name"]] = (namespace, "")

    def wait_running(self) -> None:
        for name, (namespace, _) in self.where.items():
            pod = self.cluster.wait_for_pod(namespace, name, lambda p: p.status.phase == "Running"
                                            and p.status.pod_ip, 90, "Running with an IP")
            self.where[name] = (namespace, pod.status.pod_ip)

    def dial(self, source: str, target: str, port: int) -> str | None:
        """What probe `target` answered on `port`, dialled from inside probe `source`; None
        when the connection did not open."""
        reply = dial(self.cluster, self.where[source][0], source, f"{self.where[target][1]}:{port}")
        return None if reply == DROPPED else reply
