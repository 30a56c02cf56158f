"""Single-layer OCI image archives made from files on this machine, for `ctr images import`.

No registry is reachable here, so the real nodes' images are made locally: the pause image
and the `pods` tests' probe are one static binary each. The archive is an OCI image layout
in a tar; every timestamp and owner is fixed, so the same files give the same digest.
"""

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ImageSpec:
    """name: fully qualified (registry host included: `ctr` reads a bare `x/y` as docker.io).
    files: path in the image -> file on this machine (copied with mode 0755)."""

    name: str
    files: dict[str, Path]
    entrypoint: list[str]
    env: list[str] = field(default_factory=lambda: ["PATH=/usr/local/bin:/usr/bin:/bin"])


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes | None, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
    info.mode = mode
    if data is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def layer(spec: ImageSpec) -> bytes:
    """An uncompressed layer tar: the files and the folders above them, sorted."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folders = {"tmp"}
        for path in spec.files:
            parts = path.strip("/").split("/")[:-1]
            folders |= {"/".join(parts[:i + 1]) for i in range(len(parts))}
        for folder in sorted(folders):
            _tar_member(tar, folder + "/", None, 0o1777 if folder == "tmp" else 0o755)
        for path, source in sorted(spec.files.items()):
            _tar_member(tar, path.strip("/"), Path(source).read_bytes(), 0o755)
    return buffer.getvalue()


def _blob(data: bytes, media_type: str) -> tuple[dict, str]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return {"mediaType": media_type, "digest": digest, "size": len(data)}, digest


def image_layout(spec: ImageSpec) -> dict[str, bytes]:
    """The files of the OCI image layout (path in the archive -> bytes)."""
    layer_bytes = layer(spec)
    layer_desc, layer_digest = _blob(layer_bytes, "application/vnd.oci.image.layer.v1.tar")
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": spec.entrypoint, "Env": spec.env, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }, sort_keys=True).encode()
    config_desc, _ = _blob(config, "application/vnd.oci.image.config.v1+json")
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc, "layers": [layer_desc],
    }, sort_keys=True).encode()
    manifest_desc, _ = _blob(manifest, "application/vnd.oci.image.manifest.v1+json")
    tag = spec.name.rsplit(":", 1)[1] if ":" in spec.name.rsplit("/", 1)[-1] else "latest"
    manifest_desc["annotations"] = {"io.containerd.image.name": spec.name,
                                    "org.opencontainers.image.ref.name": tag}
    index = json.dumps({"schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [manifest_desc]}, sort_keys=True).encode()
    blobs = {f"blobs/{d['digest'].replace(':', '/')}": data for d, data in (
        (layer_desc, layer_bytes), (config_desc, config), (manifest_desc, manifest))}
    return {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index, **blobs}


def write_archive(spec: ImageSpec, path: Path) -> Path:
    """Writes the image as an OCI archive at `path`."""
    with tarfile.open(path, "w") as tar:
        folders = sorted({"blobs", "blobs/sha256"})
        for folder in folders:
            _tar_member(tar, folder + "/", None, 0o755)
        for name, data in sorted(image_layout(spec).items()):
            _tar_member(tar, name, data, 0o644)
    return path
