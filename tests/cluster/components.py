"""Command lines of the control plane's programs (pure: paths and ports in, argv out)."""

from dataclasses import dataclass
from pathlib import Path

from tests.cluster.pki import Pki

SERVICE_RANGE = "10.96.0.0/16"
POD_RANGE = "10.244.0.0/16"  # kwok hands out pod IPs from here
ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int


@dataclass(frozen=True)
class Layout:
    """Where one cluster keeps its state: everything under `root`."""

    root: Path
    bin: Path

    @property
    def pki(self) -> Pki:
        return Pki(self.root / "pki")

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def kubeconfig(self, client: str) -> Path:
        return self.root / f"{client}.kubeconfig"


def etcd(layout: Layout, ports: Ports) -> list[str]:
    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    client = f"http://127.0.0.1:{ports.etcd_client}"
    return [
        str(layout.bin / "etcd"), "--name=default", f"--data-dir={layout.root / 'etcd'}",
        f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        # State is thrown away with the test run: durability buys nothing, speed does.
        "--unsafe-no-fsync", "--log-level=warn",
    ]


def apiserver(layout: Layout, ports: Ports) -> list[str]:
    pki = layout.pki
    cert, key = pki.serving
    return [
        str(layout.bin / "kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
        # 0.0.0.0: the real nodes' pods reach it through the `kubernetes` Service's address,
        # which real_network.py DNATs to the machine's address (no kube-proxy here).
        "--bind-address=0.0.0.0", "--advertise-address=127.0.0.1",
        f"--secure-port={ports.apiserver}", f"--cert-dir={layout.root / 'apiserver'}",
        f"--tls-cert-file={cert}", f"--tls-private-key-file={key}",
        f"--client-ca-file={pki.ca}",
        "--authorization-mode=RBAC",
        "--enable-admission-plugins=PodSecurity",
        "--allow-privileged=true",  # so that Pod Security admission is what refuses it
        f"--service-account-issuer={ISSUER}", f"--api-audiences={ISSUER}",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        f"--service-cluster-ip-range={SERVICE_RANGE}",
        # No kubelet serves the `kubernetes` Service's endpoint on loopback anyway.
        "--endpoint-reconciler-type=none",
        # Real nodes (real_nodes.py) have no DNS name the host resolves: logs and exec
        # reach their kubelets by the node IP.
        "--kubelet-preferred-address-types=InternalIP,Hostname",
        "--profiling=false", "--v=1",
    ]


def _delegated(layout: Layout, client: str, port: int) -> list[str]:
    config = layout.kubeconfig(client)
    return [
        f"--kubeconfig={config}", f"--authentication-kubeconfig={config}",
        f"--authorization-kubeconfig={config}", "--bind-address=127.0.0.1",
        f"--secure-port={port}", f"--cert-dir={layout.root / client}",
        "--leader-elect=false", "--v=1",
    ]


def controller_manager(layout: Layout, ports: Ports) -> list[str]:
    pki = layout.pki
    return [
        str(layout.bin / "kube-controller-manager"),
        *_delegated(layout, "controller-manager", ports.controller_manager),
        # Each controller runs as its own service account, as in kubeadm clusters, so the
        # bootstrap RBAC roles are exercised too.
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki.sa_key}",
        f"--root-ca-file={pki.ca}",
        f"--cluster-signing-cert-file={pki.ca}",
        f"--cluster-signing-key-file={pki.folder / 'ca.key'}",
        f"--service-cluster-ip-range={SERVICE_RANGE}",
        # Checks node health every second instead of every 5 s: new nodes lose their
        # not-ready taint (and a NotReady node gains it) within a second or two.
        "--node-monitor-period=1s",
    ]


def scheduler(layout: Layout, ports: Ports) -> list[str]:
    return [str(layout.bin / "kube-scheduler"),
            *_delegated(layout, "scheduler", ports.scheduler)]


def kwok(layout: Layout, ports: Ports) -> list[str]:
    return [
        str(layout.bin / "kwok"), f"--kubeconfig={layout.kubeconfig('kwok')}",
        f"--config={Path(__file__).with_name('kwok.yaml')}",
        f"--cidr={POD_RANGE}", f"--server-address=127.0.0.1:{ports.kwok}",
    ]
