"""Real nodes beside kwok's simulated pools: a kubelet and its own containerd per node.

Each node gets its own containerd (two kubelets on one containerd kill each other's pods,
issue 11), folders, socket, CNI bridge and /24, kubelet ports and cgroup root, all named
with the session's tag; the node registers in pool `real`, tainted so that only pods that
ask for it land there (`RealNodes.selector`, `.tolerations`). Images come from local OCI
archives (oci.py) imported into every node's containerd; the pause image is a static binary
built here (tools/k8s/node/pause).

What the nodes change on the host is captured before anything starts and put back by
`stop()`, whatever happened in between (host_state.py); `start()` stops what it started if
it fails halfway. Pure configuration lives in real_config.py.
"""

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from kubernetes import client

from tests.cluster import host_state, kubeconfig
from tests.cluster.binaries import ensure_net_built, ensure_netpol_built, ensure_node_built
from tests.cluster.host_state import HostState
from tests.cluster.oci import ImageSpec, write_archive
from tests.cluster.pki import add_client
from tests.cluster.processes import Child, free_ports, wait_until
from tests.cluster.real_config import (CGROUP_CONTROLLERS, PAUSE_IMAGE, POOL, REAL_NODE_TAINT,
                                       RealNodeLayout, cni_config, containerd_argv,
                                       containerd_config, kubelet_argv, kubelet_config, toml)
from tests.cluster.real_network import ClusterNetwork

PROBE_IMAGE = "bloomrun.local/probe:1"
# The tunables a kubelet sets at start and never looks at again: put back as soon as the
# nodes are Ready, so that kernel.panic_on_oops=1 (a machine that reboots on any oops) is in
# force for seconds, not for the whole session.
KUBELET_TUNABLES = ("kernel.panic", "kernel.panic_on_oops", "vm.overcommit_memory",
                    "vm.panic_on_oom", "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes")
_SUBNETS = ipaddress.ip_network("10.88.0.0/16")


def node_ip() -> str:
    """The machine's first global IPv4 address: a kubelet refuses a loopback node IP."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        return line.split()[3].split("/")[0]
    raise RuntimeError("no global IPv4 address for the real nodes' kubelets")


def free_subnets(count: int, tag: str) -> list[str]:
    """/24s of 10.88.0.0/16 that no route on the host uses yet, searched from a place the
    session's tag picks, so that two sessions starting at once rarely pick the same."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    used = [ipaddress.ip_network(word, strict=False) for line in routes.splitlines()
            for word in line.split()[:1] if "/" in word]
    found = [str(net) for net in _SUBNETS.subnets(new_prefix=24)
             if not any(net.overlaps(u) for u in used)]
    start = int(tag, 16) % len(found) if found else 0
    return (found[start:] + found[:start])[:count]


def base_images(bins: Path) -> list[ImageSpec]:
    return [ImageSpec(PAUSE_IMAGE, {"/pause": bins / "pause"}, ["/pause"]),
            ImageSpec(PROBE_IMAGE, {"/probe": bins / "probe"}, ["/probe"])]


def _pids_with(text: str) -> list[int]:
    """Processes whose command line mentions `text` (a node's own socket path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cgroup_pids(cgroup_root: str) -> list[int]:
    top = Path("/sys/fs/cgroup/pids") / cgroup_root.lstrip("/")
    pids = []
    for procs in top.rglob("cgroup.procs") if top.exists() else []:
        pids += [int(p) for p in procs.read_text().split()]
    return pids


class RealNode:
    def __init__(self, layout: RealNodeLayout, logs: Path):
        self.layout = layout
        self.logs = logs
        self.containerd: Child | None = None
        self.kubelet: Child | None = None

    @property
    def name(self) -> str:
        return self.layout.name

    def prepare(self, server: str, ca: Path, pki) -> None:
        """Folders, cgroup roots, configs and the kubelet's client identity."""
        node = self.layout
        for folder in (node.root / "containerd", node.cni_conf_dir, node.kubelet_dir,
                       node.pod_logs):
            folder.mkdir(parents=True, exist_ok=True)
        node.containerd_config_path.write_text(toml(containerd_config(node)))
        (node.cni_conf_dir / "10-bridge.conflist").write_text(json.dumps(cni_config(node)))
        node.kubelet_config_path.write_text(yaml.safe_dump(kubelet_config(node)))
        cert, key = add_client(pki, f"kubelet-{node.name}", f"system:node:{node.name}",
                               "system:nodes")
        kubeconfig.write(node.kubeconfig, kubeconfig.kubeconfig(
            server, ca, f"system:node:{node.name}", cert, key))
        # The kubelet refuses a cgroupRoot that does not exist in every controller.
        for controller in CGROUP_CONTROLLERS:
            base = Path("/sys/fs/cgroup") / controller
            if not base.is_dir():
                continue
            folder = base / node.cgroup_root.lstrip("/")
            folder.mkdir(exist_ok=True)
            if controller == "cpuset":  # a new cpuset has no CPUs until given its parent's
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (folder / knob).write_text((base / knob).read_text())

    def start_containerd(self) -> None:
        env = dict(os.environ, PATH=f"{self.layout.bins}:{os.environ.get('PATH', '')}")
        self.containerd = Child(f"containerd-{self.name}", containerd_argv(self.layout),
                                self.logs / f"containerd-{self.name}.log", env).start()
        wait_until(lambda: self._check(self.containerd) or self.layout.socket.exists(), 30,
                   f"containerd of {self.name} to listen")
        self.ctr("version")

    def ctr(self, *args: str) -> str:
        result = subprocess.run([str(self.layout.bins / "ctr"), "--address",
                                 str(self.layout.socket), "--namespace", "k8s.io", *args],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} on {self.name}: {result.stderr.strip()}")
        return result.stdout

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", str(archive))

    def start_kubelet(self) -> None:
        self.kubelet = Child(f"kubelet-{self.name}", kubelet_argv(self.layout),
                             self.logs / f"kubelet-{self.name}.log").start()

    def _check(self, child: Child | None) -> bool:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")
        return False

    def check_alive(self) -> None:
        self._check(self.containerd)
        self._check(self.kubelet)

    def stop(self) -> None:
        """Kubelet first (so nothing restarts containers), then every container process
        (by the node's cgroups), the shims (by the node's socket in their command line),
        containerd, mounts under the node's folder, its bridge."""
        if self.kubelet is not None:
            self.kubelet.stop(grace=5.0)
        for _ in range(3):
            _kill(_cgroup_pids(self.layout.cgroup_root))
            time.sleep(0.2)
        _kill(_pids_with(str(self.layout.socket)))
        if self.containerd is not None:
            self.containerd.stop(grace=5.0)
        root = str(self.layout.root)
        points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for point in sorted((p for p in points if p.startswith(root)), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.layout.bridge], capture_output=True)


class RealNodes:
    """`count` real nodes joined to `cluster` (a running control_plane.Cluster)."""

    def __init__(self, cluster, count: int = 2):
        self.cluster = cluster
        self.count = count
        self.tag = uuid.uuid4().hex[:5]
        self.root = cluster.layout.root / f"real-{self.tag}"
        self.host: HostState | None = None
        self.nodes: list[RealNode] = []
        self.images_dir = self.root / "images"
        self.network: ClusterNetwork | None = None
        self.start_seconds: float | None = None

    # -- what tests use --------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [node.name for node in self.nodes]

    @property
    def selector(self) -> dict[str, str]:
        return {"bloomrun.io/pool": POOL}

    @property
    def tolerations(self) -> list[dict]:
        return [{"key": REAL_NODE_TAINT["key"], "operator": "Exists",
                 "effect": REAL_NODE_TAINT["effect"]}]

    @property
    def own_prefixes(self) -> tuple[str, ...]:
        """How this set's bridges and cgroups begin."""
        return f"br{self.tag}", f"bloomrun-{self.tag}"

    def import_image(self, archive: Path) -> None:
        """Imports an OCI/Docker archive into every node's containerd (refer to it by its
        fully qualified name, with imagePullPolicy Never or IfNotPresent), all nodes at
        once: the trainer image's layers take minutes to unpack into each."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.import_image(archive), self.nodes))

    def lose_node(self, name: str) -> None:
        """The machine goes away: its kubelet, containerd and every container stop at once
        (no SIGTERM reaches the pods). The Node object stays; the node controller marks it
        NotReady when its heartbeats stop."""
        self._node(name).stop()

    def return_node(self, name: str) -> None:
        """The lost machine comes back: containerd and the kubelet start again on the same
        folders; the kubelet finds its pods' containers gone and reports them."""
        node = self._node(name)
        node.start_containerd()
        node.start_kubelet()
        core = client.CoreV1Api(self.cluster.api())
        self.cluster.wait(lambda: self._check() or _ready(core, name), 120, f"{name} Ready again")

    def _node(self, name: str) -> "RealNode":
        return next(node for node in self.nodes if node.name == name)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "RealNodes":
        """Captures the host's state first, so that stop() can put it back even when
        start fails partway (call stop() in a finally/finalizer registered before this)."""
        began = time.monotonic()
        bins, net_bins, netpol_bins = ensure_node_built(), ensure_net_built(), ensure_netpol_built()
        self.host = HostState.capture(under=(str(self.root),), nft=str(net_bins / "nft"))
        host_state.join(self.tag, self.host)
        self.root.mkdir(parents=True)
        self.images_dir.mkdir()
        archives = [write_archive(spec, self.images_dir / f"{spec.name.split('/')[-1]}.tar")
                    for spec in base_images(bins)]
        ip = node_ip()
        subnets = free_subnets(self.count, self.tag)
        ports = free_ports(2 * self.count)
        self._bind_node_role()
        self.network = ClusterNetwork(self.cluster, self.tag, ip, net_bins, self.root / "network",
                                      netpol_bins, f"real-{self.tag}-0")
        self.network.start()
        for index in range(self.count):
            name = f"real-{self.tag}-{index}"
            layout = RealNodeLayout(root=self.root / name, name=name, tag=self.tag,
                                    index=index, node_ip=ip, subnet=subnets[index],
                                    kubelet_port=ports[2 * index],
                                    healthz_port=ports[2 * index + 1], bins=bins,
                                    cluster_dns=self.network.dns_ip)
            node = RealNode(layout, self.cluster.layout.logs)
            self.nodes.append(node)
            node.prepare(self.cluster.server, self.cluster.layout.pki.ca, self.cluster.layout.pki)
            node.start_containerd()
            for archive in archives:
                node.import_image(archive)
            node.start_kubelet()
        core = client.CoreV1Api(self.cluster.api())
        self.cluster.wait(lambda: self._check() or all(
            _ready(core, name) for name in self.names), 120, "the real nodes to be Ready")
        self._restore_tunables()
        self.start_seconds = time.monotonic() - began
        return self

    def _check(self) -> bool:
        for node in self.nodes:
            node.check_alive()
        return False

    def _bind_node_role(self) -> None:
        """Kubelets authenticate as system:node:NAME in group system:nodes; without the Node
        authorizer they get the bootstrap `system:node` ClusterRole through RBAC."""
        rbac = client.RbacAuthorizationV1Api(self.cluster.api())
        name = f"bloomrun-real-nodes-{self.tag}"
        rbac.create_cluster_role_binding({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "system:node"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                          "name": "system:nodes"}],
        })

    def _restore_tunables(self) -> None:
        for key in KUBELET_TUNABLES:
            value = self.host.sysctls.get(key)
            if value is not None and host_state.sysctls().get(key) != value:
                Path("/proc/sys", *key.split(".")).write_text(value)

    def stop(self) -> list[str]:
        """Stops every node, deletes their Node objects and puts the host back. Returns
        what differs from the state captured at start (empty when all is restored)."""
        for node in reversed(self.nodes):
            node.stop()
        if self.network is not None:
            self.network.stop()
        try:
            core = client.CoreV1Api(self.cluster.api())
            for name in self.names:
                core.delete_node(name)
            client.RbacAuthorizationV1Api(self.cluster.api()).delete_cluster_role_binding(
                f"bloomrun-real-nodes-{self.tag}")
        except Exception as error:  # the control plane may be gone already
            print(f"real nodes: cleaning API objects failed: {error}", file=sys.stderr)
        if self.host is None:
            return []
        # Other node sets may run beside these (this session's, another clone's test run):
        # what all share (sysctls, iptables, fixed paths) is put back by the last to stop,
        # to the state the first one found (host_state.join/leave).
        # The nodes' image stores go now, passing or failing: the cluster keeps a failed
        # session's folder for its logs, and with the trainer image imported each node's
        # containerd holds ~10 GB (two failed sessions filled this machine's disk).
        for node in self.nodes:
            shutil.rmtree(node.layout.root / "containerd", ignore_errors=True)
        shutil.rmtree(self.images_dir, ignore_errors=True)
        failures = self.host.restore(cgroup_prefix=f"bloomrun-{self.tag}",
                                     link_prefix=f"br{self.tag}", shared=True)
        leftovers = self.host.differences(self.host.again(), shared=True, own=self.own_prefixes)
        pristine = host_state.leave(self.tag)
        if pristine is not None:
            failures += pristine.restore(cgroup_prefix=f"bloomrun-{self.tag}",
                                         link_prefix=f"br{self.tag}")
            leftovers += pristine.differences(pristine.again())
        return failures + leftovers


def _ready(core: client.CoreV1Api, name: str) -> bool:
    try:
        node = core.read_node(name)
    except client.ApiException:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
