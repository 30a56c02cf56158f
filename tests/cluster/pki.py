"""Certificates and keys for one cluster, made with the openssl command line.

One CA signs the apiserver's serving certificate and the client certificates of the
components; a separate key pair signs service-account tokens. EC P-256 keys: fast to make,
so every cluster gets fresh ones.
"""

import subprocess
from dataclasses import dataclass
from pathlib import Path

# Client identities the apiserver's bootstrap RBAC policy already knows.
CLIENTS = {
    "admin": ("kubernetes-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
    "kwok": ("kwok-controller", "system:masters"),
}
SERVICE_IP = "10.96.0.1"  # first address of the service range, as the apiserver expects


@dataclass(frozen=True)
class Pki:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def serving(self) -> tuple[Path, Path]:
        return self.folder / "apiserver.crt", self.folder / "apiserver.key"

    @property
    def sa_key(self) -> Path:
        return self.folder / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.folder / "sa.pub"

    def client(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"{name}.crt", self.folder / f"{name}.key"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _key(name: str, cwd: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", name, cwd=cwd)


def _signed(name: str, subject: str, extensions: str, cwd: Path) -> None:
    _key(f"{name}.key", cwd)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr",
             cwd=cwd)
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "30", "-sha256", "-extfile", f"{name}.ext",
             "-out", f"{name}.crt", cwd=cwd)


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    _key("ca.key", folder)
    _openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=bloomrun-test-ca",
             "-days", "30", "-sha256", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", "ca.crt", cwd=folder)
    names = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
             "kubernetes.default.svc.cluster.local"]
    san = ",".join([f"DNS:{n}" for n in names] + ["IP:127.0.0.1", f"IP:{SERVICE_IP}"])
    _signed("apiserver", "/CN=kube-apiserver",
            f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n", folder)
    for name, (user, group) in CLIENTS.items():
        add_client(Pki(folder), name, user, group)
    _key("sa.key", folder)
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=folder)
    return Pki(folder)


def add_client(pki: Pki, name: str, user: str, group: str | None) -> tuple[Path, Path]:
    """A client certificate and key for `user` (in `group`), signed by the cluster's CA;
    the real nodes' kubelets get theirs this way (system:node:NAME in system:nodes)."""
    subject = f"/CN={user}" + (f"/O={group}" if group else "")
    _signed(name, subject, "extendedKeyUsage=clientAuth\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n", pki.folder)
    return pki.client(name)
