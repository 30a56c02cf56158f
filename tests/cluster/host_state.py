"""What real nodes change on the host, captured before they start and put back after.

A kubelet sets kernel tunables at start (kernel.panic=10, kernel.panic_on_oops=1,
vm.overcommit_memory=1, ...: pkg/kubelet/cm/container_manager_linux.go), the CNI bridge
turns on net.ipv4.ip_forward and adds a bridge, containerd and the kubelet create cgroups
and a few fixed paths (/var/log/containers, /run/containerd/s, ...). The test suite runs on
a shared machine and CI runs right after, so everything is put back: `HostState.capture()`
before the first node starts, `restore()` when the last one has stopped (and right after the
kubelets start, to shorten the time kernel.panic_on_oops=1 is in force).
"""

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Host paths containerd 1.6 and the kubelet write to whatever their configured folders:
# the kubelet's container log symlinks, containerd's shim sockets, CNI's result cache.
FIXED_PATHS = ("/var/log/containers", "/var/log/pods", "/run/containerd", "/var/lib/cni",
               "/run/netns", "/var/run/netns", "/var/lib/kubelet", "/etc/cni", "/opt/cni")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Counters and random values that change by themselves: not state anyone set.
_VOLATILE = ("kernel.random.", "fs.dentry-state", "fs.file-nr", "fs.inode-", "kernel.ns_last_pid",
             "fs.quota.", "kernel.pty.nr", "net.netfilter.nf_conntrack_count",
             "kernel.sched_domain", "vm.stat", "net.ipv4.conf.", "net.ipv6.conf.",
             "net.ipv4.neigh.", "net.ipv6.neigh.", "kernel.tainted", "fs.aio-nr",
             "kernel.perf_event_max_sample_rate", "kernel.keys.maxkeys")


def sysctls() -> dict[str, str]:
    """Every readable, non-volatile sysctl (per-interface ones excluded: interfaces come and
    go with the bridge)."""
    values: dict[str, str] = {}
    base = Path("/proc/sys")
    for path in base.rglob("*"):
        key = ".".join(path.relative_to(base).parts)
        if key.startswith(_VOLATILE) or not path.is_file() or not os.access(path, os.R_OK):
            continue
        try:
            values[key] = path.read_text().strip()
        except OSError:
            continue
    return values


def iptables_rules() -> str | None:
    """iptables-save's rules without its timestamps, or None where iptables is absent."""
    if shutil.which("iptables-save") is None:
        return None
    out = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith("#"))


def nft_tables(nft: str | None) -> set[str] | None:
    """`family name` of every nftables table, or None without an nft program. The real
    nodes' Service NAT is a table per node set (real_config.service_nat)."""
    if nft is None:
        return None
    out = subprocess.run([nft, "list", "tables"], capture_output=True, text=True, check=True)
    return {line.split(None, 1)[1] for line in out.stdout.splitlines() if line.startswith("table ")}


def links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def top_cgroups() -> dict[str, set[str]]:
    return {c.name: {d.name for d in c.iterdir() if d.is_dir()}
            for c in CGROUP_ROOT.iterdir() if c.is_dir() and not c.is_symlink()}


def mounts(under: tuple[str, ...]) -> set[str]:
    """Mount points below `under` (only those: other programs on a shared machine mount
    things too, and their mounts are none of ours)."""
    points = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    return {p for p in points if any(p == u or p.startswith(u.rstrip("/") + "/") for u in under)}


@dataclass
class HostState:
    sysctls: dict[str, str]
    iptables: str | None
    links: set[str]
    cgroups: dict[str, set[str]]
    paths: dict[str, bool]
    mounts: set[str]
    watched: tuple[str, ...]  # where mounts are looked for: FIXED_PATHS and the nodes' folder
    nft: set[str] | None = None  # nftables tables (`ip bloomrun-<tag>`); None: no nft program
    nft_bin: str | None = None

    @classmethod
    def capture(cls, under: tuple[str, ...] = (), nft: str | None = None) -> "HostState":
        watched = FIXED_PATHS + tuple(under)
        return cls(sysctls(), iptables_rules(), links(), top_cgroups(),
                   {p: os.path.lexists(p) for p in FIXED_PATHS}, mounts(watched), watched,
                   nft_tables(nft), nft)

    def again(self) -> "HostState":
        """The host now, looked at the same way."""
        return HostState.capture(self.watched[len(FIXED_PATHS):], self.nft_bin)

    def differences(self, other: "HostState", shared: bool = False,
                    own: tuple[str, ...] = ()) -> list[str]:
        """What `other` (captured later) changed, one line each; empty when nothing did.

        shared: another test session's real nodes run on this machine too (see
        `foreign_nodes_running`); then what all sessions share (sysctls, iptables, the fixed
        paths) is not ours to judge, and only links and cgroups named with `own` prefixes
        count."""
        def ours(name: str) -> bool:
            return not shared or name.startswith(own)

        found = []
        if not shared:
            found += [f"sysctl {k}: {v!r} -> {other.sysctls.get(k)!r}"
                      for k, v in self.sysctls.items() if other.sysctls.get(k, v) != v]
            if self.iptables != other.iptables:
                found.append("iptables rules changed")
            found += [f"new path {p}" for p, there in self.paths.items()
                      if not there and os.path.lexists(p)]
        found += [f"new network link {name}" for name in sorted(other.links - self.links)
                  if ours(name)]
        for controller, names in other.cgroups.items():
            found += [f"new cgroup {controller}/{n}"
                      for n in sorted(names - self.cgroups.get(controller, set())) if ours(n)]
        found += [f"new mount {m}" for m in sorted(other.mounts - self.mounts)]
        if self.nft is not None and other.nft is not None:
            found += [f"new nft table {t}" for t in sorted(other.nft - self.nft)
                      if ours(t.split()[-1])]
        return found

    def restore(self, cgroup_prefix: str, link_prefix: str, shared: bool = False) -> list[str]:
        """Puts back what the real nodes changed: sysctls, iptables, their bridges (links
        named `link_prefix*`), cgroups and nftables tables named `cgroup_prefix*`,
        mounts below new paths, fixed paths that did not exist. Returns what it could not.
        With `shared` (another session's nodes still run) sysctls, iptables and the fixed
        paths are left to whichever session stops last: they are in use."""
        failures: list[str] = []
        now = self.again()
        for key, value in self.sysctls.items() if not shared else ():
            if now.sysctls.get(key, value) != value:
                try:
                    Path("/proc/sys", *key.split(".")).write_text(value)
                except OSError as error:
                    failures.append(f"sysctl {key}: {error}")
        if not shared and self.iptables is not None and now.iptables != self.iptables:
            subprocess.run(["iptables-restore"], input=self.iptables + "\n", text=True)
        # Pods' veths go with their network namespaces; only the bridges stay behind.
        for name in sorted(now.links - self.links):
            if name.startswith(link_prefix):
                subprocess.run(["ip", "link", "delete", name], capture_output=True)
        for table in sorted((now.nft or set()) - (self.nft or set())):
            if table.split()[-1].startswith(cgroup_prefix):  # bloomrun-<tag>: this set's NAT
                subprocess.run([self.nft_bin, "delete", "table", *table.split()],
                               capture_output=True)
        for mount in sorted(now.mounts - self.mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        for controller, names in now.cgroups.items():
            for name in names - self.cgroups.get(controller, set()):
                if name.startswith(cgroup_prefix):
                    failures += remove_cgroup_tree(CGROUP_ROOT / controller / name)
        for path, there in self.paths.items() if not shared else ():
            if not there and os.path.lexists(path):
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
        return failures


def remove_cgroup_tree(top: Path) -> list[str]:
    """rmdir's a cgroup and its children, deepest first (cgroup folders are removed with
    rmdir, never by deleting their files)."""
    failures = []
    for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            folder.rmdir()
        except OSError as error:
            failures.append(f"cgroup {folder}: {error}")
    try:
        top.rmdir()
    except OSError as error:
        failures.append(f"cgroup {top}: {error}")
    return failures


def foreign_nodes_running(own_root: str) -> bool:
    """Whether kubelets or containerds of real nodes outside `own_root` (another test
    session's cluster folder) run on this machine now."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        program = os.path.basename(argv[0]) if argv else ""
        if program in ("kubelet", "containerd") and any(a.startswith("--config=") for a in argv):
            if not any(own_root in a for a in argv):
                return True
    return False


# Test sessions whose real nodes run now, and the host as the first of them found it, so
# that the last one to stop puts the shared things back (sysctls, iptables, fixed paths)
# even when the sessions overlapped and none of them saw the machine pristine at its own
# start. Entries of dead processes are dropped.
REGISTRY = Path("/run/bloomrun-real-nodes")


def _locked(action):
    import fcntl
    REGISTRY.mkdir(exist_ok=True)
    with open(REGISTRY / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sessions = REGISTRY / "sessions"
        sessions.mkdir(exist_ok=True)
        for entry in sessions.iterdir():
            if not Path("/proc", entry.read_text().strip()).exists():
                entry.unlink()
        return action(sessions)


def join(tag: str, state: HostState) -> None:
    """Registers a node set; the first one records the host's shared state as pristine."""
    import json

    def act(sessions: Path) -> None:
        if not any(sessions.iterdir()):
            (REGISTRY / "pristine.json").write_text(json.dumps(
                {"sysctls": state.sysctls, "iptables": state.iptables, "paths": state.paths}))
        (sessions / tag).write_text(str(os.getpid()))
    _locked(act)


def leave(tag: str) -> HostState | None:
    """Unregisters a node set; returns the pristine state (shared parts only) when it was
    the last one, after removing the registry; None while other sets still run."""
    import json

    def act(sessions: Path) -> HostState | None:
        (sessions / tag).unlink(missing_ok=True)
        if any(sessions.iterdir()):
            return None
        saved = json.loads((REGISTRY / "pristine.json").read_text())
        shutil.rmtree(REGISTRY, ignore_errors=True)
        # Links and cgroups are each set's own business (named with its tag): taken as now.
        return HostState(saved["sysctls"], saved["iptables"], links(), top_cgroups(),
                         saved["paths"], set(), FIXED_PATHS)
    return _locked(act)
