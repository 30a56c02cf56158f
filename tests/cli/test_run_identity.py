"""`bloomctl run` applies the same rule as the pods: a run resumes only its own checkpoints,
and starts from another run's only through checkpoint.initFrom."""

import subprocess

import pytest
import yaml

from bloomrun.trainer import checkpoint as ckpt
from tests.cli.elastic_harness import BLOOMCTL, launcher_env, tiny_manifest


def bloomctl_run(manifest, cwd, *args) -> subprocess.CompletedProcess:
    return subprocess.run([BLOOMCTL, "run", str(manifest), "--nproc", "1", *args], cwd=cwd,
                          env=launcher_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_output_into_another_runs_folder_is_refused_and_init_from_names_a_run(tmp_path):
    first = bloomctl_run(tiny_manifest(tmp_path, steps=4, every=2, name="arm-a"), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    arm_a = tmp_path / "runs" / "arm-a"

    other = bloomctl_run(tiny_manifest(tmp_path, steps=8, every=2, name="arm-b"), tmp_path, "--output", str(arm_a))
    assert other.returncode != 0
    assert "written by run arm-a, not by this run arm-b" in other.stdout + other.stderr
    assert ckpt.newest_complete(arm_a / "checkpoints")[1]["step"] == 4  # arm-a's checkpoints untouched

    manifest = tiny_manifest(tmp_path, steps=2, every=2, name="arm-c")
    document = yaml.safe_load(manifest.read_text())
    document["spec"]["checkpoint"]["initFrom"] = {"run": "arm-a"}  # runs/arm-a, beside runs/arm-c
    manifest.write_text(yaml.safe_dump(document))
    warm = bloomctl_run(manifest, tmp_path)
    assert warm.returncode == 0, warm.stderr[-3000:]
    meta = ckpt.newest_complete(tmp_path / "runs" / "arm-c" / "checkpoints")[1]
    assert meta["run"]["name"] == "arm-c" and meta["init_from"]["run"]["name"] == "arm-a"
    assert meta["init_from"]["step"] == 4
