"""NetworkPolicy enforced for the real nodes' pods: kube-network-policies, SIG Network's
implementation (tools/k8s/build-netpol.sh), as a child process per node set.

How it works: the first packet of each new connection to or from a pod goes to an NFQUEUE;
the controller reads it there, looks up the source and destination pods in its informers
and applies the NetworkPolicies that select them (egress of the source, ingress of the
destination), accepting or dropping it; the rest of the connection follows conntrack. Its
own nftables rules use nftables' `queue` expression, which this machine's kernel lacks
(CONFIG_NFT_QUEUE unset: nft answers `queue num 100` with "Could not process rule: No such
file or directory", the controller logs "syncing nftables rules" error="conn.Receive:
netlink receive: no such file or directory"); the kernel
has the xtables NFQUEUE target instead, so netpol-queue adds the same rules with that target
in a table of this node set (`ip bloomrun-<tag>-policy`), for connections from or to this
set's bridges only (tools/k8s/netpol/queue/main.go says why by bridge and on the forward hook).
The controller's own table then fails to load, atomically (nothing is left), and it logs
that and goes on deciding the queued packets. Fail closed: while nothing reads the queue,
new connections of the set's pods are dropped, so the table goes in only once the controller
reads the queue, and comes out first at stop().

A pod is protected once the API has its IP: a packet from or to an address the controller
cannot match to a pod is judged by no pod's policies. Upstream closes that window with NRI
(kubernetes issue 85966), which the nodes' containerd 1.6 does not serve.

The controller takes its API credentials only from inside a pod (rest.InClusterConfig: the
KUBERNETES_SERVICE_* variables and /var/run/secrets/kubernetes.io/serviceaccount); it gets
them in a mount namespace of its own (a tmpfs over /run, seen by it alone), with the token of
a ServiceAccount that may only list and watch what it reads. It shares the host's network
namespace, as upstream's DaemonSet pods do (hostNetwork).
"""

import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from kubernetes import client

from tests.cluster import components
from tests.cluster.processes import Child, free_ports, wait_until

NAMESPACE = "kube-system"
# What the controller reads (kube-network-policies' install.yaml, less the admin policies' and
# the nodes it watches only for them).
RULES = [{"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["list", "watch"]},
         {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
          "verbs": ["list", "watch"]}]
QUEUES = range(1000, 65000)  # NFQUEUE numbers a node set picks from
QUEUE_STATE = Path("/proc/net/netfilter/nfnetlink_queue")
SECRETS = "/run/secrets/kubernetes.io/serviceaccount"  # /var/run is /run here
# In the controller's own mount namespace: its in-cluster credentials where it looks for
# them, without writing into the host's /run.
_IN_OWN_MOUNTS = (f"mount -t tmpfs -o size=1m,mode=0755 bloomrun-netpol /run && "
                  f"mkdir -p {SECRETS} && cp \"$1/token\" \"$1/ca.crt\" {SECRETS}/ && "
                  f"shift && exec \"$@\"")


def policy_table(tag: str) -> str:
    """Begins with the set's NAT table's name (real_config.nat_table), so that the host's
    restore and check (host_state.py) treat it as this set's too."""
    return f"bloomrun-{tag}-policy"


def bound_queues() -> set[int]:
    """NFQUEUE numbers a program reads now (first column of the kernel's queue table)."""
    if not QUEUE_STATE.exists():
        return set()
    return {int(line.split()[0]) for line in QUEUE_STATE.read_text().splitlines() if line.strip()}


def free_queue(tag: str) -> int:
    """A queue number nothing reads, searched from a place the set's tag picks (as
    real_nodes.free_subnets does), so that two sessions starting at once rarely collide."""
    taken = bound_queues()
    start = int(tag, 16) % len(QUEUES)
    for offset in range(len(QUEUES)):
        number = QUEUES[(start + offset) % len(QUEUES)]
        if number not in taken:
            return number
    raise RuntimeError("no free NFQUEUE number")


def controller_argv(bins: Path, credentials: Path, node_name: str, queue: int,
                    metrics_port: int) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _IN_OWN_MOUNTS,
            "netpol", str(credentials), str(bins / "kube-network-policies"),
            f"--hostname-override={node_name}", f"--nfqueue-id={queue}",
            # kernels from 6.12 on have the conntrack fix this works around (on the
            # controller's own hooks, which this kernel cannot load anyway)
            "--netfilter-bug-1766-fix=false",
            # Pods' IPs come from the API: v0.8.0 ignores --disable-nri (never copied into its
            # config) and finds no NRI socket in its own /run, so it falls back to the API's.
            f"--metrics-bind-address=127.0.0.1:{metrics_port}", "-v=2"]


class PolicyEnforcer:
    """kube-network-policies for the pods of node set `tag` (on its bridges, br<tag><i>:
    real_config.RealNodeLayout.bridge)."""

    def __init__(self, cluster, tag: str, bins: Path, nft: str, folder: Path, node_name: str):
        self.cluster, self.tag = cluster, tag
        self.bins, self.nft, self.folder, self.node_name = bins, nft, folder, node_name
        self.name = f"bloomrun-netpol-{tag}"
        self.table = policy_table(tag)
        self.queue: int | None = None
        self.controller: Child | None = None
        self.table_added = False

    def start(self) -> "PolicyEnforcer":
        credentials = self._credentials()
        self.queue = free_queue(self.tag)
        api = urlsplit(self.cluster.server)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "KUBERNETES_SERVICE_HOST": api.hostname,
               "KUBERNETES_SERVICE_PORT": str(api.port)}
        self.controller = Child(
            f"netpol-{self.tag}",
            controller_argv(self.bins, credentials, self.node_name, self.queue, free_ports(1)[0]),
            self.cluster.layout.logs / f"netpol-{self.tag}.log", env).start()
        # It reads the queue only once its informers have synced: then it can decide.
        wait_until(lambda: self._check() or self.queue in bound_queues(), 60,
                   "kube-network-policies to read its queue")
        added = subprocess.run([str(self.bins / "netpol-queue"), self.table, str(self.queue),
                                f"br{self.tag}"], capture_output=True, text=True)
        if added.returncode != 0:
            raise RuntimeError(f"netpol-queue failed: {added.stderr.strip()}")
        self.table_added = True
        return self

    def _check(self) -> bool:
        if self.controller is not None and not self.controller.alive():
            raise RuntimeError(f"kube-network-policies exited:\n{self.controller.log_tail()}")
        return False

    def check_alive(self) -> None:
        self._check()

    def _credentials(self) -> Path:
        """A ServiceAccount that may read what the controller reads; its token and the
        cluster's CA in a folder, for the controller's own mount namespace."""
        core = client.CoreV1Api(self.cluster.api())
        rbac = client.RbacAuthorizationV1Api(self.cluster.api())
        core.create_namespaced_service_account(NAMESPACE, {"metadata": {"name": self.name}})
        rbac.create_cluster_role({"metadata": {"name": self.name}, "rules": RULES})
        rbac.create_cluster_role_binding({
            "metadata": {"name": self.name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": self.name},
            "subjects": [{"kind": "ServiceAccount", "name": self.name, "namespace": NAMESPACE}]})
        token = core.create_namespaced_service_account_token(self.name, NAMESPACE, {"spec": {
            "audiences": [components.ISSUER], "expirationSeconds": 24 * 3600}}).status.token
        folder = self.folder / "netpol"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "token").write_text(token)
        (folder / "ca.crt").write_bytes(Path(self.cluster.layout.pki.ca).read_bytes())
        return folder

    def stop(self) -> None:
        """The queue rules first (nothing is held up for a reader that is gone), then the
        controller and its API objects."""
        if self.table_added:
            subprocess.run([self.nft, "delete", "table", "ip", self.table], capture_output=True)
            self.table_added = False
        if self.controller is not None:
            self.controller.stop(grace=3.0)
        try:
            core = client.CoreV1Api(self.cluster.api())
            rbac = client.RbacAuthorizationV1Api(self.cluster.api())
            for delete in (lambda: rbac.delete_cluster_role_binding(self.name),
                           lambda: rbac.delete_cluster_role(self.name),
                           lambda: core.delete_namespaced_service_account(self.name, NAMESPACE)):
                try:
                    delete()
                except client.ApiException as error:
                    if error.status != 404:
                        raise
        except Exception as error:  # the control plane may be gone already
            print(f"netpol: cleaning API objects failed: {error}", file=sys.stderr)
