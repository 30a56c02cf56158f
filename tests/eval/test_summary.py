"""The paper's two means from lm-eval's results: pure arithmetic on a results dict."""

import pytest

from bloomrun.cli.eval import format_summary
from bloomrun.eval.runner import mean_stderr, results_path, summarize


def test_mean_and_random_baseline_normalised_mean():
    results = {
        "results": {
            "copa": {"acc,none": 0.70, "acc_stderr,none": 0.046},  # 2 choices: random 0.5
            "arc_easy": {"acc,none": 0.55, "acc_stderr,none": 0.01, "acc_norm,none": 0.5},  # 4: 0.25
            "triviaqa": {"exact_match,remove_whitespace": 0.0, "exact_match,none": 0.05},  # random 0
            "bloomrun_stories_ppl": {"word_perplexity,none": 15.6, "word_perplexity_stderr,none": "N/A"},
        },
        "n-samples": {"copa": {"original": 100, "effective": 100}},
    }
    summary = summarize(results, {"copa": 0.5, "arc_easy": 0.25, "triviaqa": 0.0})
    by_task = {s.task: s for s in summary.scores}
    assert by_task["arc_easy"].metric == "acc" and by_task["triviaqa"].metric == "exact_match"
    assert by_task["copa"].normalised == pytest.approx(0.4)
    assert by_task["arc_easy"].normalised == pytest.approx(0.4)
    assert summary.mean == pytest.approx((0.70 + 0.55 + 0.05) / 3)
    assert summary.normalised_mean == pytest.approx((0.4 + 0.4 + 0.05) / 3)
    ppl = by_task["bloomrun_stories_ppl"]
    assert (ppl.metric, ppl.value, ppl.random, ppl.normalised) == ("word_perplexity", 15.6, None, None)
    assert by_task["copa"].num_samples == 100
    table = format_summary(summary)
    assert "copa" in table and "0.4000" in table
    assert table.splitlines()[-1] == "mean acc 0.4333, random-baseline-normalised mean 0.2833 (3 tasks)"


def test_mean_stderr_of_independent_tasks():
    assert mean_stderr([0.03, 0.04]) == pytest.approx(0.025)
    assert mean_stderr([0.03, None]) is None and mean_stderr([]) is None


def test_the_summarys_mean_stderr_covers_the_averaged_tasks_only():
    results = {"results": {
        "copa": {"acc,none": 0.70, "acc_stderr,none": 0.046},
        "arc_easy": {"acc,none": 0.55, "acc_stderr,none": 0.01},
        "bloomrun_stories_ppl": {"word_perplexity,none": 15.6, "word_perplexity_stderr,none": "N/A"},
    }}
    summary = summarize(results, {"copa": 0.5, "arc_easy": 0.25})
    assert summary.mean_stderr == pytest.approx((0.046 ** 2 + 0.01 ** 2) ** 0.5 / 2)  # the perplexity task is not averaged
    assert format_summary(summary).splitlines()[-1] == (
        "mean acc 0.6250 ± 0.0235, random-baseline-normalised mean 0.4000 (2 tasks)")
    # A task averaged without a stderr (lm-eval gives "N/A" for some): no figure for the mean.
    results["results"]["arc_easy"]["acc_stderr,none"] = "N/A"
    assert summarize(results, {"copa": 0.5, "arc_easy": 0.25}).mean_stderr is None


def test_results_live_beside_the_checkpoint_not_inside_it(tmp_path):
    step_dir = tmp_path / "checkpoints" / "step-00000300"
    assert results_path(step_dir) == tmp_path / "checkpoints" / "step-00000300.eval.json"
