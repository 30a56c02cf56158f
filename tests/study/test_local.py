"""The study folder's reading half, without training: which checkpoints are scored, each arm's phase and numbers, the table and the report's
documents, from folders laid out as bloomctl run and bloomctl eval write them."""

import json
import shutil
from pathlib import Path

import pytest

from bloomrun.study import local, report
from bloomrun.study.spec import load_study
from bloomrun.trainer.checkpoint_layout import publish_folder, step_dir_name
from bloomrun.trainer.config import EvalConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "study-position.yaml"
STEP_TOKENS = 16 * 64


def checkpoint(folder: local.StudyFolder, arm: str, step: int, loss: float) -> None:
    """Published as the trainer publishes (its history line included), without tensors."""
    root = folder.checkpoints(arm)
    (root / "tmp").mkdir(parents=True)
    publish_folder(root, root / "tmp", root / step_dir_name(step),
                   {"step": step, "tokens": step * STEP_TOKENS, "loss": loss})


def scored(folder: local.StudyFolder, arm: str, step: int, order: float, arithmetic: float) -> None:
    tasks = {"bloomrun_stories_order": {"value": order, "stderr": 0.03, "random": 0.25},
             "bloomrun_arithmetic": {"value": arithmetic, "stderr": 0.04, "random": 0.25},
             "bloomrun_stories_ppl": {"value": 15.6, "stderr": None, "random": None}}
    mean = (order + arithmetic) / 2
    summary = {"mean": mean, "normalisedMean": (mean - 0.25) / 0.75, "tasks": tasks}
    local.eval_results_path(folder.checkpoints(arm), step).write_text(json.dumps(
        {"results": {}, "bloomrun": {"step": step, "tokens": step * STEP_TOKENS, "summary": summary}}))


@pytest.fixture
def study():
    return load_study(EXAMPLE)  # 160 steps to the comparison point, checkpoints every 20


@pytest.fixture
def folder(tmp_path) -> local.StudyFolder:
    return local.StudyFolder(tmp_path / "study")


@pytest.mark.parametrize("cadence, expected", [
    ({}, [20, 40, 60, 80, 100]),
    ({"everyCheckpoints": 2}, [40, 80, 100]),
    ({"everyTokens": 50 * STEP_TOKENS}, [60, 100]),
])
def test_steps_to_score_follow_the_cadence_and_always_the_comparison_point(cadence, expected):
    history = [{"step": s, "tokens": s * STEP_TOKENS} for s in (20, 40, 60, 80, 100, 120)]
    config = EvalConfig.model_validate({"tasks": ["bloomrun_arithmetic"], **cadence})
    assert local.steps_to_score(history, config, compare_at_tokens=100 * STEP_TOKENS) == expected


def test_phases_and_numbers_come_from_the_arm_folders(study, folder):
    for step, loss in ((20, 3.1), (80, 2.2), (160, 1.7)):
        checkpoint(folder, "alibi", step, loss)
    scored(folder, "alibi", 80, 0.9, 0.3)
    scored(folder, "alibi", 160, 1.0, 0.43)
    checkpoint(folder, "rotary", 160, 1.6)
    checkpoint(folder, "none", 60, 2.4)  # interrupted at step 60
    statuses = {s.name: s for s in local.study_statuses(study, folder)}
    alibi = statuses["alibi"]
    assert alibi.phase == "Succeeded" and alibi.tokens == 160 * STEP_TOKENS and alibi.loss == 1.7
    assert alibi.mean == pytest.approx(0.715) and alibi.eval_step == 160
    assert alibi.tasks == {"bloomrun_stories_order": 1.0, "bloomrun_arithmetic": 0.43}  # perplexity not averaged
    assert alibi.stderr == pytest.approx(0.025)
    assert alibi.gpu_hours == pytest.approx(alibi.estimated_gpu_hours)  # trained exactly to the comparison
    assert statuses["rotary"].phase == "Trained" and statuses["rotary"].mean is None
    assert statuses["none"].phase == "Stopped" and statuses["none"].loss is None
    assert statuses["none"].gpu_hours == pytest.approx(alibi.gpu_hours * 60 / 160)
    shutil.rmtree(folder.checkpoints("alibi") / step_dir_name(20))  # keepLast: the curves keep it
    losses, accuracies = local.curves(study, folder, "alibi")
    assert losses == [(20 * STEP_TOKENS, 3.1), (80 * STEP_TOKENS, 2.2), (160 * STEP_TOKENS, 1.7)]
    assert accuracies == [(80 * STEP_TOKENS, pytest.approx(0.6)), (160 * STEP_TOKENS, pytest.approx(0.715))]


def test_a_pending_study_and_the_table(study, folder):
    text = local.format_table(study, local.study_statuses(study, folder))
    lines = text.splitlines()
    assert lines[0].split() == ["arm", "phase", "tokens", "GPU-h", "(est.)", "loss", "mean", "acc", "normalised",
                                "±", "stderr"]
    assert [line.split()[:2] for line in lines[1:4]] == [["alibi", "Pending"], ["rotary", "Pending"],
                                                         ["none", "Pending"]]
    assert lines[-1] == "best arm: none scored at the comparison point yet"


def test_the_reports_table_holds_the_folders_numbers(study, folder):
    for arm, order, arithmetic, loss in (("alibi", 1.0, 0.5, 1.7), ("rotary", 1.0, 0.4, 1.65), ("none", 0.9, 0.3, 2.0)):
        checkpoint(folder, arm, 160, loss)
        scored(folder, arm, 160, order, arithmetic)
    statuses = local.study_statuses(study, folder)
    text = report.markdown(study, statuses)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    header = [cell.strip("| ") for cell in rows[0]]
    assert header[4:6] == ["bloomrun_stories_order", "bloomrun_arithmetic"]
    alibi = dict(zip(header, (cell.strip("| ") for cell in rows[1])))
    assert alibi["arm"] == "alibi" and alibi["change"] == "model.position=alibi"
    assert (alibi["bloomrun_arithmetic"], alibi["mean acc"], alibi["loss at 163,840 tokens"]) == ("0.5000", "0.7500", "1.7000")
    assert "**best arm: alibi, +0.0500 mean acc over rotary, which exceeds the evaluation's standard error (0.0354)**" in text
