"""`bloomctl eval` end to end on a tiny run trained here with the real trainer: the trained
model must score clearly above chance and above its own untrained weights on the
in-distribution task (the evaluation measures learning, not only that it runs)."""

import json
import shutil
import subprocess

import pytest
import torch

from bloomrun.cli.export import load_config
from bloomrun.cli.main import main
from bloomrun.eval import runner
from bloomrun.eval.adapter import BloomLM, load_model
from bloomrun.trainer.model import build_model
from tests.cli.elastic_harness import BLOOMCTL, launcher_env, tiny_manifest
from tests.eval.conftest import TOKENIZER

STEPS = 120  # the tiny example's loss is ~1.8 by step 100 (docs/local.md)
TASKS = ["bloomrun_stories_order", "bloomrun_stories_ppl"]
LIMIT = 100


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """runs/tiny after `bloomctl run` of the tiny example, one worker, STEPS steps."""
    tmp = tmp_path_factory.mktemp("eval-run")
    manifest = tiny_manifest(tmp, steps=STEPS, every=STEPS)
    done = subprocess.run([BLOOMCTL, "run", str(manifest), "--nproc", "1"], cwd=tmp, env=launcher_env(),
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return tmp / "runs" / "tiny"


@pytest.mark.slow
def test_bloomctl_eval_scores_a_trained_run_above_chance_and_above_its_untrained_weights(trained_run):
    done = subprocess.run([BLOOMCTL, "eval", str(trained_run), "--tasks", *TASKS, "--limit", str(LIMIT)],
                          env=launcher_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    step_dir = trained_run / "checkpoints" / f"step-{STEPS:08d}"
    saved = json.loads((step_dir.parent / f"{step_dir.name}.eval.json").read_text())
    # lm-eval's full results, with what was scored and by which versions
    assert {"results", "versions", "n-samples", "configs"} <= set(saved)
    assert saved["n-samples"]["bloomrun_stories_order"]["effective"] == LIMIT
    assert "acc_stderr,none" in saved["results"]["bloomrun_stories_order"]
    assert saved["bloomrun"]["step"] == STEPS and saved["bloomrun"]["lmEvalVersion"] == "0.4.13"
    summary = saved["bloomrun"]["summary"]
    trained = summary["tasks"]["bloomrun_stories_order"]["value"]
    assert summary["tasks"]["bloomrun_stories_order"]["random"] == 0.25
    assert summary["mean"] == trained  # the perplexity task is reported, not averaged
    assert summary["normalisedMean"] == pytest.approx((trained - 0.25) / 0.75)
    # the printed table: per-task accuracy, the mean and the normalised mean
    assert "bloomrun_stories_order  acc" in done.stdout and "random-baseline-normalised mean" in done.stdout
    assert "word_perplexity" in done.stdout and str(step_dir) in done.stdout

    config = load_config(trained_run / "config.yaml")
    torch.manual_seed(config.training.seed)
    untrained = BloomLM(build_model(config.model).eval(), TOKENIZER)
    _, before = runner.evaluate(untrained, TASKS, limit=LIMIT)
    before = {s.task: s.value for s in before.scores}
    assert trained >= 0.6, f"trained accuracy {trained} is not clearly above chance (0.25)"
    assert trained >= before["bloomrun_stories_order"] + 0.25
    trained_ppl = summary["tasks"]["bloomrun_stories_ppl"]["value"]
    assert trained_ppl < before["bloomrun_stories_ppl"] / 10


@pytest.mark.slow  # shares the trained run
def test_bad_input_is_one_line_and_exit_2(trained_run, tmp_path, capsys):
    def refused(*argv) -> str:
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        return err

    assert "no such run folder or checkpoint" in refused(str(tmp_path / "nope"))
    assert "Input should be" in refused(str(trained_run), "--tasks", "no_such_task")
    assert "eval.limit" in refused(str(trained_run), "--limit", "0")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(trained_run, corrupt)
    weights = corrupt / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    assert "no complete checkpoint" in refused(str(corrupt))
    assert "metadata says" in refused(str(weights.parent))  # truncated: its size is wrong

    # a task staged as a local json task whose data file is absent
    staged = tmp_path / "tasks"
    staged.mkdir()
    (staged / "copa.yaml").write_text(
        "task: copa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {staged / 'copa.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{premise}}'\ndoc_to_choice: '{{[choice1, choice2]}}'\ndoc_to_target: label\n")
    err = refused(str(trained_run), "--tasks", "copa", "--task-data-dir", str(staged))
    assert err.startswith("bloomctl eval: error: task copa: its data is not staged"), err
    assert "no such folder" in refused(str(trained_run), "--task-data-dir", str(tmp_path / "absent"))


def test_a_checkpoint_removed_before_its_evaluation_says_so(tmp_path, capsys):
    """The evaluation Job's case: the step folder it was made for is gone (deleted by hand;
    the trainer's pruning keeps one whose evaluation is pending). Bad input: exit 2, one line
    that the operator records in status.evaluation.lastFailure."""
    (tmp_path / "checkpoints").mkdir()
    summary = tmp_path / "summary"
    gone = tmp_path / "checkpoints" / "step-00000600"
    assert main(["eval", str(gone), "--summary-file", str(summary)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"bloomctl eval: error: {gone}: no such checkpoint: it was removed before it could be scored "
                   "(deleted, or pruned by checkpoint.keepLast without the run's status saying its evaluation "
                   "was pending)"), err
    assert "removed before it could be scored" in summary.read_text()
    # Any other missing path keeps the general message.
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "no such run folder or checkpoint" in capsys.readouterr().err
