"""What a real (kubelet + containerd) test node is made of: its folders, ports, subnet and
the configs of containerd, the CNI bridge and the kubelet. Pure: a layout in, configs out.

Every path a node writes lives under its own folder, and every name it gives the host (the
bridge, the cgroup root) carries the session's tag, so two nodes (and two test sessions)
never share state. Facts behind the settings are from the trial in issue 11.
"""

from dataclasses import dataclass
from pathlib import Path

PAUSE_IMAGE = "bloomrun.local/pause:1"  # fully qualified: a bare name is read as docker.io
POOL = "real"
# Pods land on a real node only when they ask to: other tests' pods, made for kwok's pools,
# must never be scheduled where no image of theirs exists.
REAL_NODE_TAINT = {"key": "bloomrun.io/real-node", "value": "true", "effect": "NoSchedule"}
CLUSTER_DOMAIN = "cluster.local"
CGROUP_CONTROLLERS = ("blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "memory",
                      "pids", "systemd")


@dataclass(frozen=True)
class RealNodeLayout:
    """One real node: `root` is its folder, `tag` the session's (a few hex digits)."""

    root: Path
    name: str
    tag: str
    index: int
    node_ip: str
    subnet: str  # the pods' /24, routed on the host through the node's bridge
    kubelet_port: int
    healthz_port: int
    bins: Path  # kubelet, containerd, runc, cni/
    cluster_dns: str | None = None  # the kube-dns Service's IP (real_network.py); None: none

    @property
    def bridge(self) -> str:
        return f"br{self.tag}{self.index}"[:15]  # IFNAMSIZ

    @property
    def cgroup_root(self) -> str:
        return f"/bloomrun-{self.tag}-{self.name}"

    @property
    def socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def containerd_config_path(self) -> Path:
        return self.root / "containerd" / "config.toml"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def kubelet_dir(self) -> Path:
        return self.root / "kubelet"

    @property
    def kubelet_config_path(self) -> Path:
        return self.root / "kubelet-config.yaml"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubelet.kubeconfig"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"


def containerd_config(node: RealNodeLayout) -> dict:
    """containerd 1.6's config (version 2) for one node; write it with `toml()`."""
    cri = {
        "sandbox_image": PAUSE_IMAGE,
        # This machine's root lacks CAP_SYS_RESOURCE: without this every sandbox fails with
        # "can't get final child's PID from pipe" (issue 11).
        "restrict_oom_score_adj": True,
        "stream_server_address": "127.0.0.1",
        "stream_server_port": "0",
        # Network namespaces under the node's own state folder, not the host's /run/netns.
        "netns_mounts_under_state_dir": True,
        "containerd": {
            "snapshotter": "overlayfs",
            "default_runtime_name": "runc",
            "runtimes": {"runc": {
                "runtime_type": "io.containerd.runc.v2",
                "options": {"BinaryName": str(node.bins / "runc"), "SystemdCgroup": False},
            }},
        },
        "cni": {"bin_dir": str(node.bins / "cni"), "conf_dir": str(node.cni_conf_dir),
                "max_conf_num": 1},
    }
    return {
        "version": 2,
        "root": str(node.root / "containerd" / "root"),
        "state": str(node.root / "containerd" / "state"),
        "grpc": {"address": str(node.socket)},
        "ttrpc": {"address": f"{node.socket}.ttrpc"},
        "plugins": {
            "io.containerd.grpc.v1.cri": cri,
            "io.containerd.internal.v1.opt": {"path": str(node.root / "containerd" / "opt")},
        },
    }


def cni_config(node: RealNodeLayout) -> dict:
    """The pods' network: a bridge with the node's subnet, the host as gateway. No IP
    masquerade and no portmap: both need iptables, which this machine lacks (and nothing
    here leaves the host)."""
    return {
        "cniVersion": "0.4.0",
        "name": f"bloomrun-{node.tag}-{node.index}",
        "plugins": [{
            "type": "bridge", "bridge": node.bridge, "isGateway": True, "ipMasq": False,
            "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": node.subnet}]],
                     "routes": [{"dst": "0.0.0.0/0"}],
                     "dataDir": str(node.root / "cni" / "ipam")},
        }],
    }


def kubelet_config(node: RealNodeLayout) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # The apiserver calls the kubelet (logs, exec) without a client certificate.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "address": node.node_ip,
        "port": node.kubelet_port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": node.healthz_port,
        "containerRuntimeEndpoint": f"unix://{node.socket}",
        "cgroupDriver": "cgroupfs",  # no systemd here
        "cgroupRoot": node.cgroup_root,
        "failCgroupV1": False,  # this machine has cgroup v1 (hybrid)
        "failSwapOn": False,
        "podLogsDir": str(node.pod_logs),
        "registerWithTaints": [dict(REAL_NODE_TAINT)],
        "nodeStatusUpdateFrequency": "2s",
        "syncFrequency": "5s",
        "fileCheckFrequency": "5s",
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # A full disk elsewhere on a shared machine must not evict test pods.
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "clusterDomain": CLUSTER_DOMAIN,
        # Without clusterDNS a ClusterFirst pod gets the host's resolv.conf, and the
        # headless-service names the workers rendezvous at do not resolve.
        **({"clusterDNS": [node.cluster_dns]} if node.cluster_dns else {}),
        "resolvConf": "/etc/resolv.conf",
        "serializeImagePulls": False,
        "shutdownGracePeriod": "0s",
    }


def kubelet_argv(node: RealNodeLayout) -> list[str]:
    return [
        str(node.bins / "kubelet"), f"--config={node.kubelet_config_path}",
        f"--kubeconfig={node.kubeconfig}", f"--root-dir={node.kubelet_dir}",
        f"--cert-dir={node.kubelet_dir / 'pki'}", f"--node-ip={node.node_ip}",
        f"--hostname-override={node.name}",
        f"--node-labels=bloomrun.io/pool={POOL},type=real",
        "--v=1",
    ]


def containerd_argv(node: RealNodeLayout) -> list[str]:
    return [str(node.bins / "containerd"), f"--config={node.containerd_config_path}",
            "--log-level=warn"]


def corefile(listen_ip: str, port: int, kubeconfig: Path) -> str:
    """CoreDNS's config: the cluster's names from the API server (the kubernetes plugin,
    what kube-dns Deployments run), on one address and port of the host. Nothing else is
    answered: the pods have no business outside the cluster here."""
    return f"""{CLUSTER_DOMAIN}:{port} in-addr.arpa:{port} {{
    bind {listen_ip}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        ttl 5
    }}
}}
"""


@dataclass(frozen=True)
class Forward:
    """A Service address the pods use, and where on the host its one endpoint listens."""

    service_ip: str
    port: int
    protocol: str  # tcp or udp
    to_ip: str
    to_port: int


def nat_table(tag: str) -> str:
    return f"bloomrun-{tag}"


def service_nat(tag: str, forwards: list[Forward]) -> str:
    """An nft script: DNAT of Service addresses for packets coming from this node set's
    bridges (`br<tag>*`) only, what kube-proxy's rules would do for these Services. A
    table per node set, so that two test sessions' rules never meet and each deletes only
    its own."""
    rules = "\n".join(
        f'        iifname "br{tag}*" ip daddr {f.service_ip} {f.protocol} dport {f.port} '
        f"dnat to {f.to_ip}:{f.to_port}" for f in forwards)
    return (f"table ip {nat_table(tag)} {{\n"
            "    chain prerouting {\n"
            "        type nat hook prerouting priority dstnat; policy accept;\n"
            f"{rules}\n    }}\n}}\n")


def toml(table: dict, prefix: str = "") -> str:
    """TOML text for nested dicts of str/int/bool/list (all containerd's config needs)."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(item) for item in v) + "]"
        raise TypeError(f"no TOML for {type(v).__name__}")

    scalars = [f"{key} = {value(v)}" for key, v in table.items() if not isinstance(v, dict)]
    lines = ([f"[{prefix}]"] if prefix and scalars else []) + scalars
    for key, v in table.items():
        if isinstance(v, dict):
            quoted = f'"{key}"' if "." in key else key
            lines += ["", toml(v, f"{prefix}.{quoted}" if prefix else quoted)]
    return "\n".join(line for line in lines if line is not None).strip() + "\n"
