"""`bloomctl validate`: the offline check, its one-line errors and exit codes."""

import subprocess
import sys
from pathlib import Path

import yaml

from bloomrun.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def test_the_examples_are_valid(capsys):
    assert main(["validate", str(REPO / "examples/tiny.yaml"), str(REPO / "examples/ablation-1b3-alibi.yaml")]) == 0
    err = capsys.readouterr().err
    assert "valid BloomRun 'tiny'" in err and "24 layers x 2048 hidden x 16 heads" in err


def test_a_bad_manifest_exits_2_with_one_line_naming_the_field(tmp_path):
    document = yaml.safe_load((REPO / "examples/tiny.yaml").read_text())
    document["spec"]["nodes"] = {"min": 3, "max": 2}
    document["spec"]["env"] = [{"name": "WORLD_SIZE", "value": "9"}]
    document["spec"]["checkpoint"]["dir"] = "/mine"  # the launcher's to decide
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    result = subprocess.run([str(Path(sys.executable).parent / "bloomctl"), "validate", str(path)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "spec.nodes: min (3) must not exceed max (2)" in lines[0]
    assert "spec.env.0.name: WORLD_SIZE is reserved" in lines[0]
    assert "spec.checkpoint.dir: set by the launcher, not the manifest" in lines[0]


def test_render_prints_the_children(capsys):
    assert main(["validate", "--render", "-n", "team", str(REPO / "examples/ablation-1b3-alibi.yaml")]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    kinds = [d["kind"] for d in documents]
    assert kinds.count("Pod") == 8 and "ConfigMap" in kinds and "Role" in kinds
    pod = next(d for d in documents if d["kind"] == "Pod")
    assert pod["metadata"]["namespace"] == "team"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
