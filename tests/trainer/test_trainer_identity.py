"""Real trainer runs (torchrun, 1 CPU rank): a run resumes only its own checkpoints, and warm
starts from another run's only when asked (checkpoint.initFrom) and only if they fit."""

from __future__ import annotations

import json

import pytest

from tests.trainer.trainer_runs import Run, checkpoint_steps, config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def arm_a(corpus, tmp_path_factory):
    """The first arm: 4 steps, checkpoints at 2 and 4, run name `arm-a`."""
    folder = tmp_path_factory.mktemp("arm-a")
    return Run(folder, config(corpus, folder / "checkpoints", steps=4), ranks=1,
               env={"BLOOMRUN_RUN_NAME": "arm-a"}).run()


def refused(run: Run) -> str:
    code = run.start().wait()
    assert code != 0, run.output()[-3000:]
    return run.output()


def test_checkpoints_record_whose_they_are_and_what_they_fit(arm_a):
    meta = json.loads((arm_a.folder / "checkpoints" / "step-00000004" / "metadata.json").read_text())
    assert meta["run"] == {"name": "arm-a", "namespace": None, "uid": None}
    assert meta["compatibility"]["model.numLayers"] == 2 and meta["init_from"] is None


def test_another_run_pointed_at_the_folder_is_refused_naming_both(arm_a, corpus, tmp_path):
    """The second arm of a study given the first arm's folder must not train on its weights."""
    cfg = config(corpus, arm_a.folder / "checkpoints", steps=6)
    output = refused(Run(tmp_path, cfg, ranks=1, env={"BLOOMRUN_RUN_NAME": "arm-b"}))
    assert "written by run arm-a, not by this run arm-b" in output
    assert checkpoint_steps(arm_a.folder / "checkpoints") == [2, 4]  # nothing of arm-a's touched


def test_the_same_run_with_a_changed_knob_is_refused_naming_the_field(arm_a, corpus, tmp_path):
    cfg = config(corpus, arm_a.folder / "checkpoints", steps=6)
    cfg["model"]["embeddingLayernorm"] = False
    output = refused(Run(tmp_path, cfg, ranks=1, env={"BLOOMRUN_RUN_NAME": "arm-a"}))
    assert "model.embeddingLayernorm: True -> False" in output


def test_a_warm_start_loads_the_other_runs_weights_and_records_it(arm_a, corpus, tmp_path):
    cfg = config(corpus, tmp_path / "checkpoints", steps=2)
    cfg["checkpoint"]["initFrom"] = {"path": str(arm_a.folder / "checkpoints")}
    warm = Run(tmp_path, cfg, ranks=1, env={"BLOOMRUN_RUN_NAME": "arm-c"}).run()
    meta = json.loads((tmp_path / "checkpoints" / "step-00000002" / "metadata.json").read_text())
    assert meta["run"]["name"] == "arm-c" and meta["step"] == 2  # its own run, from step 0
    assert meta["init_from"]["step"] == 4 and meta["init_from"]["run"]["name"] == "arm-a"
    # It starts where arm-a ended, not from a fresh init: its first loss is arm-a's last level.
    first_warm, first_a, last_a = warm.global_steps()[1]["loss"], arm_a.global_steps()[1]["loss"], \
        arm_a.global_steps()[4]["loss"]
    assert abs(first_warm - last_a) < abs(first_warm - first_a), (first_warm, first_a, last_a)


def test_a_warm_start_that_does_not_fit_is_refused(arm_a, corpus, tmp_path):
    cfg = config(corpus, tmp_path / "checkpoints", steps=2)
    cfg["model"]["numLayers"] = 3
    cfg["checkpoint"]["initFrom"] = {"path": str(arm_a.folder / "checkpoints")}
    output = refused(Run(tmp_path, cfg, ranks=1, env={"BLOOMRUN_RUN_NAME": "arm-d"}))
    assert "model.numLayers: 2 -> 3" in output
    assert not checkpoint_steps(tmp_path / "checkpoints")
