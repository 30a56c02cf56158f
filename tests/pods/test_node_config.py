"""The real nodes' pure parts: containerd's TOML, the OCI archives of the local images."""

import tarfile
import tomllib
from pathlib import Path

from tests.cluster.oci import ImageSpec, write_archive
from tests.cluster.real_config import RealNodeLayout, containerd_config, kubelet_config, toml


def layout(tmp_path: Path) -> RealNodeLayout:
    return RealNodeLayout(root=tmp_path / "n", name="real-abc-0", tag="abc", index=0,
                          node_ip="192.0.2.2", subnet="10.88.0.0/24", kubelet_port=10250,
                          healthz_port=10248, bins=tmp_path / "bin")


def test_containerd_config_is_valid_toml_with_the_settings_this_machine_needs(tmp_path):
    config = containerd_config(layout(tmp_path))
    parsed = tomllib.loads(toml(config))
    assert parsed == config
    cri = parsed["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True and cri["netns_mounts_under_state_dir"] is True
    assert parsed["root"].startswith(str(tmp_path)) and parsed["state"].startswith(str(tmp_path))


def test_kubelet_config_keeps_the_node_in_its_own_folders_and_cgroup(tmp_path):
    config = kubelet_config(layout(tmp_path))
    assert config["cgroupRoot"] == "/bloomrun-abc-real-abc-0"
    assert config["podLogsDir"].startswith(str(tmp_path))
    assert config["failCgroupV1"] is False and config["cgroupDriver"] == "cgroupfs"


def test_the_same_files_make_the_same_image_archive(tmp_path):
    binary = tmp_path / "tool"
    binary.write_bytes(b"\x7fELF not really")
    spec = ImageSpec("bloomrun.local/tool:1", {"/tool": binary}, ["/tool"])
    first = write_archive(spec, tmp_path / "a.tar").read_bytes()
    second = write_archive(spec, tmp_path / "b.tar").read_bytes()
    assert first == second
    with tarfile.open(tmp_path / "a.tar") as tar:
        names = tar.getnames()
    assert {"oci-layout", "index.json"} <= set(names)
    assert sum(name.startswith("blobs/sha256/") for name in names) == 3
