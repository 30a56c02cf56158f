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


def test_kubelet_config_names_the_cluster_dns_only_when_there_is_one(tmp_path):
    from dataclasses import replace

    assert "clusterDNS" not in kubelet_config(layout(tmp_path))
    config = kubelet_config(replace(layout(tmp_path), cluster_dns="10.96.0.10"))
    assert config["clusterDNS"] == ["10.96.0.10"] and config["clusterDomain"] == "cluster.local"


def test_service_nat_translates_only_packets_from_the_node_sets_own_bridges():
    from tests.cluster.real_config import Forward, service_nat

    script = service_nat("abc12", [Forward("10.96.0.1", 443, "tcp", "192.0.2.2", 6443),
                                   Forward("10.96.0.10", 53, "udp", "192.0.2.2", 5300)])
    rules = [line.strip() for line in script.splitlines() if "dnat" in line]
    assert rules == ['iifname "brabc12*" ip daddr 10.96.0.1 tcp dport 443 dnat to 192.0.2.2:6443',
                     'iifname "brabc12*" ip daddr 10.96.0.10 udp dport 53 dnat to 192.0.2.2:5300']
    assert script.startswith("table ip bloomrun-abc12 {") and "hook prerouting priority dstnat" in script


def test_corefile_serves_the_cluster_domain_from_the_api_on_one_address():
    from tests.cluster.real_config import corefile

    text = corefile("192.0.2.2", 5300, Path("/k/admin.kubeconfig"))
    assert text.startswith("cluster.local:5300 in-addr.arpa:5300 {")
    assert "bind 192.0.2.2" in text and "kubeconfig /k/admin.kubeconfig" in text
    assert "forward" not in text  # nothing outside the cluster is answered


def test_dns_query_and_reply_parsing_round_trip():
    import struct

    from tests.cluster.real_network import a_records, dns_query

    query = dns_query("run-rendezvous.run.ns.svc.cluster.local")
    assert query[12:16] == b"\x0erun-rendezvous"[:4] and query.endswith(b"\x00\x00\x01\x00\x01")
    # The server's reply: the query's header with QR set and two answers, the first a
    # compressed pointer to the question's name, then a CNAME-sized non-A record skipped.
    header = struct.pack(">HHHHHH", 0x1b1b, 0x8180, 1, 2, 0, 0)
    answer_a = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 5, 4) + bytes([10, 88, 3, 7])
    answer_txt = b"\xc0\x0c" + struct.pack(">HHIH", 16, 1, 5, 3) + b"\x02hi"
    reply = header + query[12:] + answer_txt + answer_a
    assert a_records(reply) == ["10.88.3.7"]
