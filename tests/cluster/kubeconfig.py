"""Kubeconfig files for the cluster's clients."""

import base64
from pathlib import Path

import yaml


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def kubeconfig(server: str, ca: Path, user: str, cert: Path | None = None,
               key: Path | None = None, token: str | None = None,
               namespace: str = "default") -> dict:
    """A single-context kubeconfig with its certificates embedded, so it stays valid when
    copied elsewhere (for example into a helm or operator subprocess's environment)."""
    credentials: dict = {}
    if cert is not None and key is not None:
        credentials = {"client-certificate-data": _b64(cert), "client-key-data": _b64(key)}
    if token is not None:
        credentials["token"] = token
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "bloomrun-test", "cluster": {
            "server": server, "certificate-authority-data": _b64(ca)}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "bloomrun-test", "context": {
            "cluster": "bloomrun-test", "user": user, "namespace": namespace}}],
        "current-context": "bloomrun-test",
    }


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
