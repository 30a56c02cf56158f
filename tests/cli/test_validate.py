"""`bloomctl validate`: the offline check, its one-line errors and exit codes."""

import subprocess
import sys
from pathlib import Path

import yaml

from bloomrun.cli.main import main

REPO = Path(__file__).resolve().parents[2]
BLOOMCTL = str(Path(sys.executable).parent / "bloomctl")


def bloomctl_validate(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([BLOOMCTL, "validate", *args], capture_output=True, text=True, cwd=REPO, input=input)


def test_the_examples_are_valid_and_say_so_on_stdout(capsys):
    assert main(["validate", str(REPO / "examples/tiny.yaml"), str(REPO / "examples/ablation-1b3-alibi.yaml")]) == 0
    out, err = capsys.readouterr()
    assert "valid BloomRun 'tiny'" in out and "24 layers x 2048 hidden x 16 heads" in out
    assert err == ""


def test_a_bad_manifest_exits_2_with_one_line_naming_the_field(tmp_path):
    document = yaml.safe_load((REPO / "examples/tiny.yaml").read_text())
    document["spec"]["nodes"] = {"min": 3, "max": 2}
    document["spec"]["env"] = [{"name": "WORLD_SIZE", "value": "9"}]
    document["spec"]["checkpoint"]["dir"] = "/mine"  # the launcher's to decide
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    result = bloomctl_validate(str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "spec.nodes: min (3) must not exceed max (2)" in lines[0]
    assert "spec.env.0.name: WORLD_SIZE is reserved" in lines[0]
    assert "spec.checkpoint.dir: set by the launcher, not the manifest" in lines[0]


def test_every_file_is_checked_and_reported_and_any_failure_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "examples/tiny.yaml").read_text().replace("trainSteps: 300", "trainSteps: '300'"))
    result = bloomctl_validate(str(bad), "examples/ablation-1b3-alibi.yaml", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and "Traceback" not in result.stderr
    assert "bad.yaml: spec.training.trainSteps: Input should be a valid integer" in errors[0]
    assert "missing.yaml: no such file" in errors[1]
    assert result.stdout.startswith("examples/ablation-1b3-alibi.yaml: valid BloomRun 'ablation-1b3-alibi'")


def test_dash_reads_standard_input():
    result = bloomctl_validate("-", input=(REPO / "examples/tiny.yaml").read_text())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("-: valid BloomRun 'tiny'")
    result = bloomctl_validate("-", input="apiVersion: bloomrun.io/v1alpha1\nkind: BloomRun\nkind: BloomRun\n")
    assert result.returncode == 2 and "-: line 3, column 1: invalid YAML: duplicate key 'kind'" in result.stderr


def test_pathological_input_ends_in_one_line_and_exit_2(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    wide = tmp_path / "huge.yaml"
    wide.write_text("# " + "x" * 2_000_000 + "\n")
    bomb = tmp_path / "bomb.yaml"  # YAML aliases: a billion values from a few lines
    bomb.write_text("a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
        f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n" for i in range(8)))
    result = bloomctl_validate(str(deep), str(wide), str(bomb))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3, errors
    assert "deep.yaml: invalid YAML: nested too deeply" in errors[0]
    assert "huge.yaml: 2000003 bytes, larger than" in errors[1]
    assert "bomb.yaml: the document holds more than 100000 values" in errors[2]


def test_render_prints_the_children_after_a_comment(capsys):
    assert main(["validate", "--render", "-n", "team", str(REPO / "examples/ablation-1b3-alibi.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ") and "valid BloomRun 'ablation-1b3-alibi'" in out.splitlines()[0]
    documents = list(yaml.safe_load_all(out))
    kinds = [d["kind"] for d in documents]
    assert kinds.count("Pod") == 2 and "ConfigMap" in kinds and "Role" in kinds  # nodes.max
    pod = next(d for d in documents if d["kind"] == "Pod")
    assert pod["metadata"]["namespace"] == "team"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}


def test_the_installs_rules_come_from_the_charts_defaults_or_a_values_file(tmp_path, capsys):
    """The chart's runPolicy: the defaults refuse a system PriorityClass; an install's values
    file may allow fewer nodes than a manifest asks for."""
    document = yaml.safe_load((REPO / "examples/tiny.yaml").read_text())
    document["spec"]["priorityClassName"] = "system-node-critical"
    critical = tmp_path / "critical.yaml"
    critical.write_text(yaml.safe_dump(document))
    assert main(["validate", str(critical)]) == 2
    assert "spec.priorityClassName: 'system-node-critical' is a system PriorityClass" in capsys.readouterr().err
    values = tmp_path / "values.yaml"
    values.write_text("runPolicy:\n  maxNodes: 1\n")
    assert main(["validate", "--values", str(values), str(REPO / "examples/ablation-1b3-alibi.yaml")]) == 2
    assert "spec.nodes.max: 2 nodes, this install allows at most 1" in capsys.readouterr().err
    values.write_text("runPolicy:\n  maxNodes: many\n")
    assert main(["validate", "--values", str(values), str(REPO / "examples/tiny.yaml")]) == 2
    assert "maxNodes must be an integer 1-1024, got 'many'" in capsys.readouterr().err


def test_a_study_is_validated_by_kind_and_its_arms_rendered(tmp_path):
    result = bloomctl_validate("--render", "examples/study-position.yaml")
    assert result.returncode == 0, result.stderr
    assert "valid BloomStudy 'study-position': 3 arms (alibi, rotary, none)" in result.stdout
    arms = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [a["metadata"]["name"] for a in arms] == ["study-position-alibi", "study-position-rotary",
                                                     "study-position-none"]
    document = yaml.safe_load((REPO / "examples/study-position.yaml").read_text())
    document["spec"]["budget"]["gpuHours"] = 1e-12
    path = tmp_path / "poor.yaml"
    path.write_text(yaml.safe_dump(document))
    refused = bloomctl_validate(str(path))
    assert refused.returncode == 2 and "spec.budget.gpuHours" in refused.stderr
