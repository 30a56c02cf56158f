"""Where the cluster's binaries are cached, and building them when they are missing."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools" / "k8s"
NAMES = (
    "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl",
    "kwok", "helm", "prometheus", "promtool",
)


def bin_dir() -> Path:
    """The cache folder for the pinned versions; BLOOMRUN_K8S_BIN overrides it."""
    if override := os.environ.get("BLOOMRUN_K8S_BIN"):
        return Path(override)
    out = subprocess.run(
        ["bash", str(TOOLS / "bindir.sh")], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip())


def ensure_built() -> Path:
    """Returns the binary folder, building it first (as `make k8s` does) if incomplete."""
    folder = bin_dir()
    if not (folder / ".complete").exists() and "BLOOMRUN_K8S_BIN" not in os.environ:
        print(f"building the test cluster's binaries into {folder} (once)", file=sys.stderr)
        subprocess.run(["bash", str(TOOLS / "build.sh")], check=True)
    missing = [name for name in NAMES if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: run `make k8s`")
    return folder


NODE_NAMES = ("kubelet", "pause", "probe", "containerd", "containerd-shim-runc-v2", "ctr",
              "runc", "cni/bridge", "cni/host-local", "cni/loopback")


def node_bin_dir() -> Path:
    """The real nodes' cache folder (tools/k8s/build-node.sh); BLOOMRUN_NODE_BIN overrides it."""
    if override := os.environ.get("BLOOMRUN_NODE_BIN"):
        return Path(override)
    out = subprocess.run(["bash", str(TOOLS / "bindir.sh"), "node"], check=True,
                         capture_output=True, text=True)
    return Path(out.stdout.strip())


def ensure_node_built() -> Path:
    """The real nodes' binary folder, built first (as `make k8s` does) if incomplete."""
    folder = node_bin_dir()
    if not (folder / ".complete").exists() and "BLOOMRUN_NODE_BIN" not in os.environ:
        print(f"building the real nodes' binaries into {folder} (once)", file=sys.stderr)
        subprocess.run(["bash", str(TOOLS / "build-node.sh")], check=True)
    missing = [name for name in NODE_NAMES if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: run `make k8s`")
    return folder


NET_NAMES = ("coredns", "nft")


def net_bin_dir() -> Path:
    """The real nodes' cluster DNS and NAT folder (tools/k8s/build-net.sh); BLOOMRUN_NET_BIN
    overrides it."""
    if override := os.environ.get("BLOOMRUN_NET_BIN"):
        return Path(override)
    out = subprocess.run(["bash", str(TOOLS / "bindir.sh"), "net"], check=True,
                         capture_output=True, text=True)
    return Path(out.stdout.strip())


def ensure_net_built() -> Path:
    """CoreDNS and nft for the real nodes, built first (as `make k8s` does) if incomplete."""
    folder = net_bin_dir()
    if not (folder / ".complete").exists() and "BLOOMRUN_NET_BIN" not in os.environ:
        print(f"building the real nodes' CoreDNS and nft into {folder} (once)", file=sys.stderr)
        subprocess.run(["bash", str(TOOLS / "build-net.sh")], check=True)
    missing = [name for name in NET_NAMES if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: run `make k8s`")
    return folder


NETPOL_NAMES = ("kube-network-policies", "netpol-queue", "netprobe")


def netpol_bin_dir() -> Path:
    """The real nodes' NetworkPolicy enforcement folder (tools/k8s/build-netpol.sh);
    BLOOMRUN_NETPOL_BIN overrides it."""
    if override := os.environ.get("BLOOMRUN_NETPOL_BIN"):
        return Path(override)
    out = subprocess.run(["bash", str(TOOLS / "bindir.sh"), "netpol"], check=True,
                         capture_output=True, text=True)
    return Path(out.stdout.strip())


def ensure_netpol_built() -> Path:
    """kube-network-policies and its helpers, built first (as `make k8s` does) if incomplete."""
    folder = netpol_bin_dir()
    if not (folder / ".complete").exists() and "BLOOMRUN_NETPOL_BIN" not in os.environ:
        print(f"building the real nodes' NetworkPolicy enforcement into {folder} (once)",
              file=sys.stderr)
        subprocess.run(["bash", str(TOOLS / "build-netpol.sh")], check=True)
    missing = [name for name in NETPOL_NAMES if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: run `make k8s`")
    return folder
