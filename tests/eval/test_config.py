"""The `eval` section: what a manifest may say, refused offline naming the field, and task
names that lm-eval knows."""

import pytest
import yaml

from bloomrun.eval import tasks
from bloomrun.operator.crd import build_crd
from bloomrun.operator.spec import ManifestError, load_manifest_text
from bloomrun.trainer.config import BLOOMRUN_EVAL_TASKS, EVAL_SUITES, EvalConfig
from tests.eval.conftest import REPO


def manifest(eval_section) -> str:
    document = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    document["spec"]["eval"] = eval_section
    return yaml.safe_dump(document)


def test_a_manifest_carries_eval_into_the_trainer_config():
    run = load_manifest_text(manifest({"suite": "bigscience-27", "everyTokens": 10**9, "limit": 100}), "m.yaml")
    config = run.spec.trainer_config()
    assert config.eval.task_names() == list(EVAL_SUITES["bigscience-27"]) and len(config.eval.task_names()) == 27
    assert (config.eval.every_tokens, config.eval.limit, config.eval.batch_size) == (10**9, 100, 16)
    assert load_manifest_text(manifest(None), "m.yaml").spec.eval is None


@pytest.mark.parametrize(("section", "message"), [
    ({"tasks": ["arc_easy", "no_such_task"]}, "spec.eval.tasks.1: Input should be 'arc_challenge'"),
    ({"tasks": ["piqa"], "suite": "bigscience-27"}, "spec.eval: give exactly one of tasks and suite"),
    ({}, "spec.eval: give exactly one of tasks and suite"),
    ({"suite": "bigscience-28"}, "spec.eval.suite: Input should be 'bigscience-27'"),
    ({"suite": "bigscience-27", "everyTokens": 5, "everyCheckpoints": 2}, "give at most one of everyCheckpoints and everyTokens"),
    ({"tasks": ["piqa", "piqa"]}, "spec.eval: tasks must not repeat a task"),
    ({"tasks": ["piqa"], "limit": 0}, "spec.eval.limit: Input should be greater than or equal to 1"),
    ({"tasks": ["piqa"], "batchSize": 0}, "spec.eval.batchSize: Input should be greater than or equal to 1"),
    ({"tasks": ["piqa"], "taskDataDir": ""}, "spec.eval.taskDataDir: String should have at least 1 character"),
    ({"tasks": ["piqa"], "every": 3}, "spec.eval.every: unknown field"),
])
def test_bad_eval_sections_are_refused_naming_the_field(section, message):
    with pytest.raises(ManifestError) as err:
        load_manifest_text(manifest(section), "m.yaml")
    assert message in str(err.value)


def test_the_crd_says_the_same_as_the_models():
    eval_schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["eval"]
    tasks_schema = eval_schema["properties"]["tasks"]
    assert tasks_schema["items"]["enum"] == list(EVAL_SUITES["bigscience-27"] + BLOOMRUN_EVAL_TASKS)
    assert tasks_schema["x-kubernetes-list-type"] == "set"  # the API server refuses a repeated name
    rules = {rule["message"]: rule["rule"] for rule in eval_schema["x-kubernetes-validations"]}
    assert rules["give exactly one of tasks and suite"] == "has(self.tasks) != has(self.suite)"
    assert "everyTokens" in rules["give at most one of everyCheckpoints and everyTokens"]


def test_every_task_name_exists_in_the_pinned_lm_eval():
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    assert set(EVAL_SUITES["bigscience-27"]) <= known, set(EVAL_SUITES["bigscience-27"]) - known
    assert tuple(tasks.TASKS) == BLOOMRUN_EVAL_TASKS
    assert EvalConfig(tasks=list(BLOOMRUN_EVAL_TASKS)).task_names() == list(BLOOMRUN_EVAL_TASKS)
