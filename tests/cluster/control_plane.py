"""One running test cluster: its processes, its clients, and the levers tests pull.

Start order: etcd and kube-apiserver together (the apiserver waits for etcd), then, once
the apiserver is ready, the controller-manager, scheduler and kwok; then the node pools.
"""

import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tests.cluster import components, identities, kubeconfig
from tests.cluster.binaries import ensure_built
from tests.cluster.components import Layout, Ports
from tests.cluster.levers import Levers
from tests.cluster.nodes import initial_nodes, node_manifest, schedulable
from tests.cluster.pki import CLIENTS, make_pki
from tests.cluster.processes import Child, free_ports, wait_until
from tests.cluster.prometheus import Prometheus

# kube-apiserver stops listening within milliseconds of SIGTERM but then lingers for tens of
# seconds (seen with v1.37.2); nothing it still holds matters, so it is killed after this.
_STOP_GRACE = 2.0


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


class Cluster(Levers):
    """A control plane running under `root` (a fresh temporary folder by default)."""

    def __init__(self, bin_dir: Path, root: Path | None = None):
        root = root or Path(tempfile.mkdtemp(prefix="bloomrun-cluster-"))
        self.layout = Layout(root=root, bin=bin_dir)
        self.bin_dir = bin_dir
        self.kubeconfig = str(self.layout.kubeconfig("admin"))
        self.ports = Ports(*free_ports(len(Ports.__dataclass_fields__)))
        self.server = f"https://127.0.0.1:{self.ports.apiserver}"
        self.start_seconds: float | None = None
        self._children: dict[str, Child] = {}
        self._prometheus: list[Prometheus] = []
        self._spawned: list[Child] = []
        self._core: client.CoreV1Api | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "Cluster":
        began = time.monotonic()
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        pki = make_pki(self.layout.pki.folder)
        for name, (user, _) in CLIENTS.items():
            cert, key = pki.client(name)
            kubeconfig.write(self.layout.kubeconfig(name),
                             kubeconfig.kubeconfig(self.server, pki.ca, user, cert, key))
        self._spawn("etcd", components.etcd)
        self._spawn("kube-apiserver", components.apiserver)
        self._wait_apiserver_ready(timeout=90)
        self._core = client.CoreV1Api(self.api())
        for name, argv in (("kube-controller-manager", components.controller_manager),
                           ("kube-scheduler", components.scheduler),
                           ("kwok", components.kwok)):
            self._spawn(name, argv)
        for name, pool in initial_nodes():
            self._core.create_node(node_manifest(name, pool))
        self.wait(lambda: all(schedulable(n) for n in self._core.list_node().items),
                   60, "the kwok nodes to be Ready and untainted")
        self.wait(lambda: _exists(lambda: self._core.read_namespaced_service_account(
            "default", "default")), 60, "the controller-manager to create service accounts")
        self.wait(lambda: _healthy(self.ports.scheduler), 60, "the scheduler to be ready")
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self, keep_state: bool = False, keep_logs: bool = False) -> None:
        """Stops every process; deletes the state folder unless `keep_state`, or all of it
        but logs, certificates and kubeconfigs with `keep_logs` (etcd's write-ahead log
        alone preallocates 64 MB)."""
        for handle in self._prometheus:
            handle.stop()
        for child in self._spawned:
            child.stop()
        for child in reversed(list(self._children.values())):
            child.stop(grace=_STOP_GRACE)
        if keep_state:
            return
        if not keep_logs:
            shutil.rmtree(self.layout.root, ignore_errors=True)
            return
        shutil.rmtree(self.layout.root / "etcd", ignore_errors=True)
        for data in self.layout.root.glob("prometheus-*/data"):
            shutil.rmtree(data, ignore_errors=True)

    def _spawn(self, name: str, argv_of) -> Child:
        child = Child(name, argv_of(self.layout, self.ports), self.layout.logs / f"{name}.log")
        self._children[name] = child.start()
        return child

    def _check_alive(self) -> None:
        for child in self._children.values():
            if not child.alive():
                raise RuntimeError(f"{child.name} exited; its log ends with:\n"
                                   f"{child.log_tail()}")

    def wait(self, predicate, timeout: float, what: str):
        """Polls predicate() until truthy and returns its value; fails early, with the
        log tail, if a control-plane process died meanwhile."""
        return wait_until(predicate, timeout, what, check=self._check_alive)

    def _wait_apiserver_ready(self, timeout: float) -> None:
        pki = self.layout.pki
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(*map(str, pki.client("admin")))

        self.wait(lambda: _readyz(self.server, context), timeout, "kube-apiserver /readyz")

    def restart_apiserver(self) -> None:
        """Stops kube-apiserver and starts it again on the same port and etcd; returns once
        it is ready. Clients reconnect by themselves; watches end and must be re-opened."""
        self._children["kube-apiserver"].stop(grace=_STOP_GRACE)
        self._spawn("kube-apiserver", components.apiserver)
        self._wait_apiserver_ready(timeout=90)

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> Child:
        """Starts a program of the tests' own (an operator, say) with the admin kubeconfig
        unless `env` says otherwise; it is stopped with the cluster if not before. The
        returned Child has .stop(), .start() (again, same command), .alive(), .log_tail()
        and .log (its output file)."""
        log = self.layout.logs / f"{name}-{uuid.uuid4().hex[:6]}.log"
        child = Child(name, [str(a) for a in argv], log, env if env is not None else self.env())
        self._spawned.append(child.start())
        return child

    # -- clients ---------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = self.kubeconfig
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        helm_home = self.layout.root / "helm"
        env |= {f"HELM_{kind}_HOME": str(helm_home / kind.lower())
                for kind in ("CACHE", "CONFIG", "DATA")}
        return env

    def _run(self, program: str, args, input: str | None, check: bool):
        result = subprocess.run([str(self.bin_dir / program), *map(str, args)], input=input,
                                capture_output=True, text=True, env=self.env())
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, result.args, result.stdout, result.stderr)
        return result

    def kubectl(self, *args, input: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
        return self._run("kubectl", args, input, check)

    def helm(self, *args, input: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
        return self._run("helm", args, input, check)

    def api(self) -> client.ApiClient:
        """A new kubernetes ApiClient acting as the cluster admin (system:masters)."""
        return config.new_client_from_config(config_file=self.kubeconfig)

    def impersonating(self, user: str, groups: list[str] | None = None) -> client.ApiClient:
        """An ApiClient acting as `user` (for example system:serviceaccount:NS:NAME)."""
        return identities.impersonating_client(self.kubeconfig, user, groups)

    def token_kubeconfig(self, namespace: str, service_account: str,
                         expiration_seconds: int = 3600) -> str:
        """A kubeconfig holding a real token of an existing service account (TokenRequest),
        for a subprocess (an operator) that must run with exactly that identity."""
        request = {"spec": {"audiences": [components.ISSUER],
                            "expirationSeconds": expiration_seconds}}
        token = self._core.create_namespaced_service_account_token(
            service_account, namespace, request).status.token
        user = identities.service_account_user(namespace, service_account)
        path = self.layout.root / f"sa-{namespace}-{service_account}-{uuid.uuid4().hex[:6]}.kubeconfig"
        kubeconfig.write(path, kubeconfig.kubeconfig(self.server, self.layout.pki.ca, user,
                                                     token=token, namespace=namespace))
        return str(path)

    # -- namespaces ------------------------------------------------------------------------

    def new_namespace(self, prefix: str, pod_security: str | None = "baseline") -> str:
        """Creates a uniquely named namespace, enforcing a Pod Security level (None: no
        label, so the cluster default `privileged` applies), and waits for its default
        service account, without which pods are refused."""
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        labels = {}
        if pod_security is not None:
            labels = {"pod-security.kubernetes.io/enforce": pod_security,
                      "pod-security.kubernetes.io/enforce-version": "latest"}
        self._core.create_namespace({"metadata": {"name": name, "labels": labels}})
        self.wait(lambda: _exists(lambda: self._core.read_namespaced_service_account(
            "default", name)), 30, f"the default service account in {name}")
        return name

    # -- prometheus ------------------------------------------------------------------------

    def start_prometheus(self, scrape_config, rule_files=()) -> Prometheus:
        """Starts a Prometheus (Debian's binary) on a free port with `scrape_config`: a
        YAML string or dict holding a whole config or a list of scrape configs. Stopped
        with the cluster if not before."""
        if isinstance(scrape_config, str):
            scrape_config = yaml.safe_load(scrape_config)
        folder = Path(tempfile.mkdtemp(prefix="prometheus-", dir=self.layout.root))
        handle = Prometheus(self.bin_dir, folder, scrape_config, list(rule_files)).start()
        self._prometheus.append(handle)
        return handle


def _exists(read) -> bool:
    try:
        read()
        return True
    except ApiException as error:
        if error.status == 404:
            return False
        raise


def _readyz(base_url: str, context: ssl.SSLContext) -> bool:
    """Whether a component's /readyz answers 200 over TLS with `context`."""
    try:
        with urllib.request.urlopen(f"{base_url}/readyz", context=context, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _healthy(port: int) -> bool:
    # The component's self-signed serving cert: nothing to verify it against.
    return _readyz(f"https://127.0.0.1:{port}", ssl._create_unverified_context())


def start_cluster(root: Path | None = None) -> Cluster:
    """Builds the binaries if needed and starts a cluster; stops it again if start fails.
    A port taken by someone else between choosing and binding it gets one more try on
    fresh ports."""
    bin_dir = ensure_built()
    for attempt in (1, 2):
        cluster = Cluster(bin_dir, root)
        try:
            return cluster.start()
        except Exception as error:
            cluster.stop(keep_logs=True)
            if attempt == 1 and "address already in use" in str(error):
                continue
            print(f"the test cluster failed to start; logs in {cluster.layout.logs}",
                  file=sys.stderr)
            raise
        except BaseException:
            cluster.stop(keep_logs=True)
            raise
    raise AssertionError("unreachable")
