"""Cluster DNS and Service addresses for the real nodes' pods, without kube-proxy.

What the pods of a BloomRun need: the `kubernetes` Service (the operator's in-cluster
client, the trainer's progress reports) and cluster DNS (the workers find the rendezvous
store by its name under the run's headless Service, `R-rendezvous.R.NS.svc`; torchrun's
agents find each other by their pods' names). Headless names resolve to pod IPs, which the
host routes to the nodes' bridges already, so two Service addresses are all that needs
translating here:

- CoreDNS (tools/k8s/build-net.sh) runs on the host as a child process, listening on the
  machine's address and a free port, reading the API with the admin kubeconfig (the
  kubernetes plugin, as a kube-dns Deployment does). The `kube-dns` Service in kube-system
  is a real ClusterIP Service (its address is the API server's choice) and the kubelets'
  `clusterDNS`.
- An nftables table per node set DNATs, for packets from the set's own bridges only, the
  `kubernetes` Service's address:443 to the API server and the kube-dns address:53 to
  CoreDNS. This machine's kernel has nf_tables but no iptables programs; nft is Debian's,
  unpacked (build-net.sh). The API server binds 0.0.0.0 for this (components.apiserver).

NetworkPolicy is enforced for the set's pods by kube-network-policies (real_policy.py),
started last, once DNS and the Service addresses work, and stopped first.

The tables and CoreDNS go with the node set (stop()); host_state.py checks the tables are gone.
"""

import socket
import struct
import subprocess
from pathlib import Path

from kubernetes import client

from tests.cluster.processes import Child, free_ports, wait_until
from tests.cluster.real_config import CLUSTER_DOMAIN, Forward, corefile, nat_table, service_nat
from tests.cluster.real_policy import PolicyEnforcer

DNS_SERVICE = ("kube-system", "kube-dns")


def dns_query(name: str) -> bytes:
    """A DNS query for the A record of `name` (RFC 1035: header, one question)."""
    header = struct.pack(">HHHHHH", 0x1b1b, 0x0100, 1, 0, 0, 0)  # id, RD, one question
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.rstrip(".").split("."))
    return header + labels + b"\0" + struct.pack(">HH", 1, 1)


def a_records(reply: bytes) -> list[str]:
    """The IPv4 addresses in a DNS reply's answer section (compressed names allowed)."""
    answers = struct.unpack(">H", reply[6:8])[0]
    offset = 12
    while reply[offset]:  # the question's name
        offset += reply[offset] + 1
    offset += 5  # its terminator, type, class
    found = []
    for _ in range(answers):
        while True:  # the answer's name: labels, ending in 0 or a 2-byte pointer
            length = reply[offset]
            if length == 0:
                offset += 1
                break
            if length >= 0xC0:
                offset += 2
                break
            offset += length + 1
        kind, _, _, size = struct.unpack(">HHIH", reply[offset:offset + 10])
        offset += 10
        if kind == 1 and size == 4:
            found.append(socket.inet_ntoa(reply[offset:offset + 4]))
        offset += size
    return found


def resolve(server: tuple[str, int], name: str, timeout: float = 2.0) -> list[str]:
    """A records of `name` from the DNS server at `server` over UDP ([] on no answer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(dns_query(name), server)
            return a_records(sock.recv(4096))
        except OSError:
            return []


class ClusterNetwork:
    """CoreDNS, the Service NAT and NetworkPolicy for one node set (tag), on the host address
    `node_ip`; `node_name` is one of the set's nodes (the policy controller's)."""

    def __init__(self, cluster, tag: str, node_ip: str, net_bins: Path, folder: Path,
                 netpol_bins: Path, node_name: str):
        self.cluster, self.tag, self.node_ip = cluster, tag, node_ip
        self.nft = str(net_bins / "nft")
        self.coredns_bin = net_bins / "coredns"
        self.folder = folder
        self.policy = PolicyEnforcer(cluster, tag, netpol_bins, self.nft, folder, node_name)
        self.coredns: Child | None = None
        self.dns_ip: str | None = None
        self.dns_port: int | None = None
        self.table_added = False

    def start(self) -> "ClusterNetwork":
        core = client.CoreV1Api(self.cluster.api())
        self.dns_ip = _dns_service(core)
        api_ip = core.read_namespaced_service("kubernetes", "default").spec.cluster_ip
        self.dns_port = free_ports(1)[0]
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "Corefile"
        config.write_text(corefile(self.node_ip, self.dns_port, Path(self.cluster.kubeconfig)))
        self.coredns = Child(f"coredns-{self.tag}", [str(self.coredns_bin), "-conf", str(config)],
                             self.cluster.layout.logs / f"coredns-{self.tag}.log").start()
        server = (self.node_ip, self.dns_port)
        wait_until(lambda: self._check() or resolve(server, f"kubernetes.default.svc.{CLUSTER_DOMAIN}")
                   == [api_ip], 60, "CoreDNS to answer for the kubernetes Service")
        api_port = int(self.cluster.server.rsplit(":", 1)[1])
        forwards = [Forward(api_ip, 443, "tcp", self.node_ip, api_port),
                    Forward(self.dns_ip, 53, "udp", self.node_ip, self.dns_port),
                    Forward(self.dns_ip, 53, "tcp", self.node_ip, self.dns_port)]
        subprocess.run([self.nft, "-f", "-"], input=service_nat(self.tag, forwards), text=True,
                       check=True, capture_output=True)
        self.table_added = True
        self.policy.start()
        return self

    def _check(self) -> bool:
        if self.coredns is not None and not self.coredns.alive():
            raise RuntimeError(f"CoreDNS exited:\n{self.coredns.log_tail()}")
        return False

    def stop(self) -> None:
        self.policy.stop()
        if self.table_added:
            subprocess.run([self.nft, "delete", "table", "ip", nat_table(self.tag)],
                           capture_output=True)
        if self.coredns is not None:
            self.coredns.stop(grace=3.0)


def _dns_service(core: client.CoreV1Api) -> str:
    """The kube-dns Service's address, creating the Service (no selector: CoreDNS runs on
    the host) when this cluster has none yet; a second node set on the cluster shares it."""
    namespace, name = DNS_SERVICE
    try:
        return core.read_namespaced_service(name, namespace).spec.cluster_ip
    except client.ApiException as error:
        if error.status != 404:
            raise
    ports = [{"name": f"dns-{p.lower()}", "port": 53, "protocol": p} for p in ("UDP", "TCP")]
    created = core.create_namespaced_service(namespace, {
        "metadata": {"name": name, "labels": {"k8s-app": "kube-dns"}},
        "spec": {"ports": ports}})
    return created.spec.cluster_ip
