"""The evaluation Job's real container command, run here outside a pod: the command line the
operator renders works with the image's entry point, and what it leaves in the termination
message is what the operator parses. A tiny untrained checkpoint; bloomrun's own task."""

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from bloomrun.eval import message
from bloomrun.eval.runner import mean_stderr
from bloomrun.operator import desired, evaluation
from bloomrun.operator.evaluation import JobView
from bloomrun.operator.reconcile import plan
from bloomrun.operator.spec import BloomRunStatus, Progress
from bloomrun.trainer.checkpoint import TrainState, publish
from bloomrun.trainer.model import build_model

from .conftest import make_run

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow]  # two lm-eval runs in subprocesses: 158 s together on the shared 2-core VM
STEP, TOKENS = 40, 40 * 48 * 64
T0 = datetime(2026, 12, 1, 10, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def pod_paths(tmp_path):
    """A run whose volumes are folders here: its checkpoint of STEP on the 'checkpoint volume',
    the demo tokenizer on the 'data volume'."""
    run = make_run(gpusPerNode=0, checkpointVolume={"claimName": "ckpt", "mountPath": str(tmp_path / "ckpt")},
                   dataVolume={"claimName": "data", "mountPath": str(REPO / "examples" / "data")},
                   data={"sources": [{"path": "stories_text_document"}], "tokenizer": "tokenizer.json"},
                   eval={"tasks": ["bloomrun_arithmetic"], "limit": 20, "batchSize": 8})
    torch.manual_seed(0)
    model = build_model(run.spec.model)
    publish(Path(desired.run_checkpoint_dir(run)), TrainState(step=STEP, tokens=TOKENS), model.state_dict(), {}, {})
    config = tmp_path / "config.yaml"  # the ConfigMap's file, as mounted at /etc/bloomrun
    config.write_text(desired.desired_config_map(run)["data"][desired.CONFIG_FILE])
    return run, config, tmp_path / "termination-log"


def container_command(run, config: Path, summary_file: Path) -> list[str]:
    """The Job's command with the pod's fixed paths (the ConfigMap mount, the termination log)
    pointed at files here, and this interpreter for `python`."""
    command = evaluation.desired_job(run, STEP)["spec"]["template"]["spec"]["containers"][0]["command"]
    fixed = {f"{desired.CONFIG_DIR}/{desired.CONFIG_FILE}": str(config), evaluation.SUMMARY_FILE: str(summary_file),
             "python": sys.executable}
    return [fixed.get(arg, arg) for arg in command]


def run_in_pod_env(command: list[str]) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(REPO)}
    env |= {e["name"]: e["value"] for e in evaluation.eval_env(make_run()) if e["name"] != "HOME"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def finished(run, step, state, summary_text) -> BloomRunStatus:
    """The run's status after the operator saw the checkpoint, then its Job end with `summary_text`."""
    status = BloomRunStatus(progress=Progress(step=step, checkpoint_step=step, checkpoint_tokens=TOKENS))
    status = plan(run, status, [], T0, eval_jobs=[]).status
    view = JobView(name=evaluation.job_name(run, step), uid="u", step=step, state=state, owner_uid=run.uid,
                   summary=summary_text)
    return plan(run, status, [], T0, eval_jobs=[view]).status


def test_the_jobs_command_scores_the_checkpoint_and_reports_what_the_operator_reads(pod_paths):
    run, config, summary_file = pod_paths
    done = run_in_pod_env(container_command(run, config, summary_file))
    assert done.returncode == 0, done.stderr[-3000:]
    text = summary_file.read_text()
    assert len(text.encode()) <= message.MAX_BYTES and "\n" not in text
    report = message.decode(text)
    assert report.ok and report.step == STEP and report.tokens == TOKENS
    assert set(report.accuracies) == {"bloomrun_arithmetic"} and 0 <= report.mean <= 1
    # lm-eval's full results beside the checkpoint, as bloomctl eval writes them.
    results = Path(desired.run_checkpoint_dir(run)) / f"step-{STEP:08d}.eval.json"
    assert results.is_file()
    status = finished(run, STEP, "Complete", text)
    assert status.evaluation.step == STEP and status.evaluation.tasks == report.accuracies
    assert status.evaluation.mean == report.mean and status.evaluation.scored == 1
    # The figures a study compares arms by are, exactly, those a local study reads from the
    # results file (bloomrun.study.local.arm_status): the mean and the stderr of the mean.
    local = json.loads(results.read_text())["bloomrun"]["summary"]
    averaged = [t for t in local["tasks"].values() if t["random"] is not None]
    assert status.evaluation.mean == local["mean"]
    assert status.evaluation.mean_stderr == mean_stderr([t["stderr"] for t in averaged]) is not None
    assert status.evaluation.task_stderr == {"bloomrun_arithmetic": round(averaged[0]["stderr"], 4)}


def test_a_corrupt_checkpoint_exits_with_the_code_the_job_does_not_retry_and_says_why(pod_paths):
    run, config, summary_file = pod_paths
    (Path(desired.run_checkpoint_dir(run)) / f"step-{STEP:08d}" / "model.safetensors").write_bytes(b"garbage")
    done = run_in_pod_env(container_command(run, config, summary_file))
    assert done.returncode == evaluation.EXIT_BAD_INPUT, done.stderr[-3000:]
    report = message.decode(summary_file.read_text())
    assert not report.ok and "model.safetensors" in report.error
    status = finished(run, STEP, "Failed", summary_file.read_text())
    assert status.evaluation.failed == 1 and "model.safetensors" in status.evaluation.last_failure.message
