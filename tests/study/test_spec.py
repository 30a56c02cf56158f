"""The BloomStudy spec: merging arms onto the base, and every refusal naming its field."""

import copy
from pathlib import Path

import pytest
import yaml

from bloomrun.operator.spec import parse_manifest, world_size_refusals
from bloomrun.plan.arithmetic import count_parameters, gpu_hours
from bloomrun.study import spec as study_spec
from bloomrun.study.spec import (
    ArmStatus,
    StudyError,
    arm_costs,
    arm_manifest,
    arm_specs,
    budget_shares,
    compare,
    describe,
    load_study,
    merge_patch,
    parse_study,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "study-position.yaml"


@pytest.fixture
def document() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def refusal(document: dict) -> str:
    with pytest.raises(StudyError) as err:
        parse_study(document)
    return str(err.value)


# ------------------------------------------------------------------------- merging


def test_merge_patch_merges_mappings_replaces_lists_and_deletes_nulls():
    base = {"model": {"preset": "tiny", "position": "alibi"}, "data": {"sources": [{"path": "a"}, {"path": "b"}]},
            "training": {"trainSteps": 10, "seed": 1}}
    patch = {"model": {"position": "rotary"}, "data": {"sources": [{"path": "c"}]},
             "training": {"trainSteps": None, "trainTokens": 640}}
    merged = merge_patch(base, patch)
    assert merged == {"model": {"preset": "tiny", "position": "rotary"}, "data": {"sources": [{"path": "c"}]},
                      "training": {"seed": 1, "trainTokens": 640}}
    assert base["model"]["position"] == "alibi" and base["training"]["trainSteps"] == 10  # not modified


def test_the_example_gives_three_arms_that_differ_only_in_position(document):
    study = parse_study(document)
    specs = arm_specs(study.spec)
    assert list(specs) == ["alibi", "rotary", "none"]
    assert [s.model.position for s in specs.values()] == ["alibi", "rotary", "none"]
    dumps = [s.model_dump() for s in specs.values()]
    for dump in dumps:
        dump["model"].pop("position")
    assert dumps[0] == dumps[1] == dumps[2]
    for run in specs.values():
        assert run.training.train_tokens == document["spec"]["compareAtTokens"]
        assert run.eval.task_names() == ["bloomrun_stories_order", "bloomrun_arithmetic"]
        assert run.eval.limit == 100
        assert run.data.sources[0].path == "data/stories_text_document"


def test_an_arm_trains_to_the_comparison_point_on_its_full_runs_schedule(document):
    document["spec"]["base"]["training"]["trainTokens"] = 4 * document["spec"]["compareAtTokens"]
    specs = arm_specs(parse_study(document).spec)
    run = specs["alibi"]
    assert run.training.train_tokens == document["spec"]["compareAtTokens"]
    assert run.optim.decay_tokens == 4 * document["spec"]["compareAtTokens"]  # the cosine of the whole run


def test_an_arm_may_change_the_length_of_its_own_run(document):
    document["spec"]["base"]["training"]["trainTokens"] = 2 * document["spec"]["compareAtTokens"]
    document["spec"]["arms"][1]["patch"]["training"] = {"trainTokens": None, "trainSteps": 400}
    specs = arm_specs(parse_study(document).spec)
    assert specs["alibi"].optim.decay_tokens == 2 * document["spec"]["compareAtTokens"]
    assert specs["rotary"].optim.decay_tokens == 400 * 16 * 64
    assert specs["rotary"].training.train_steps is None


def test_the_budget_is_shared_in_proportion_to_each_arms_estimate(document):
    document["spec"]["arms"][2]["patch"] = {"model": {"numLayers": 6}}
    study = parse_study(document)
    costs = arm_costs(study.spec)
    tokens = document["spec"]["compareAtTokens"]
    runs = arm_specs(study.spec)
    assert costs["alibi"] == pytest.approx(gpu_hours(count_parameters(runs["alibi"].model), tokens, 150.0))
    assert costs["none"] > 2 * costs["alibi"]
    shares = budget_shares(study.spec)
    assert sum(shares.values()) == pytest.approx(document["spec"]["budget"]["gpuHours"])
    assert shares["none"] / shares["alibi"] == pytest.approx(costs["none"] / costs["alibi"])
    assert runs["none"].budget.gpu_hours == pytest.approx(shares["none"])


def test_arm_manifest_is_a_valid_bloomrun_with_the_studys_labels(document, tmp_path):
    from bloomrun.operator.spec import load_manifest

    study = parse_study(document)
    manifest = arm_manifest(study, "rotary")
    assert manifest["metadata"]["name"] == "study-position-rotary"
    assert manifest["metadata"]["labels"] == {"bloomrun.io/study": "study-position", "bloomrun.io/arm": "rotary"}
    path = tmp_path / "arm.yaml"
    path.write_text(yaml.safe_dump(manifest))
    run = load_manifest(path)
    assert run.spec.model.position == "rotary"
    assert run.spec == arm_specs(study.spec)["rotary"]


def test_load_study_reads_the_example_file():
    assert load_study(EXAMPLE).metadata.name == "study-position"


# ------------------------------------------------------------------------ refusals


def test_two_arms_equal_after_merging_are_refused(document):
    # alibi is the preset's default, so {position: alibi} and {} merge to the same run.
    document["spec"]["arms"][1]["patch"] = {}
    assert refusal(document) == ("spec.arms[1] (rotary): equal to spec.arms[0] (alibi) after merging onto "
                                 "spec.base: an arm must change something")


@pytest.mark.parametrize("patch, field", [
    ({"model": {"seqLength": 128}}, "model.seqLength 64 -> 128"),
    ({"model": {"vocabSize": 2048}}, "model.vocabSize 1024 -> 2048"),
    ({"data": {"tokenizer": "data/other.json"}}, "data.tokenizer data/tokenizer.json -> data/other.json"),
    ({"data": {"seed": 7}}, "data.seed 1234 -> 7"),
    ({"training": {"seed": 7}}, "training.seed 1234 -> 7"),
])
def test_an_arm_that_changes_the_basis_is_refused_unless_it_says_so(document, patch, field):
    document["spec"]["arms"][2]["patch"] = patch
    message = refusal(copy.deepcopy(document))
    assert message.startswith("spec.arms[2] (none): changes the comparison's basis")
    assert field in message and "spec.arms[2].changesBasis: true" in message
    document["spec"]["arms"][2]["changesBasis"] = True
    assert parse_study(document).spec.arms[2].changes_basis


def test_a_budget_below_the_estimate_is_refused_with_the_estimate(document):
    document["spec"]["budget"]["gpuHours"] = 1e-7
    message = refusal(document)
    assert message.startswith("spec.budget.gpuHours (1e-07) is below the arms' estimated cost, 1.207e-06 GPU-hours")
    assert "alibi 4.023e-07" in message and "8 x parameters x 163,840 tokens at 150 TFLOP/s per GPU (a100-80gb)" in message


def test_the_budget_is_priced_on_the_gpu_type_or_the_measured_rate(document):
    document["spec"]["budget"] = {"gpuHours": 1e-6, "gpu": "h100-80gb"}
    parse_study(copy.deepcopy(document))  # 390 TFLOP/s: the same arms fit
    document["spec"]["budget"]["achievedTflops"] = 100.0
    assert "at 100 TFLOP/s per GPU (h100-80gb)" in refusal(copy.deepcopy(document))
    document["spec"]["budget"] = {"gpuHours": 1, "gpu": "v100"}
    assert refusal(document).startswith("spec.budget.gpu: Input should be 'a100-80gb'")


def test_an_arm_whose_merged_spec_is_invalid_is_named_with_the_patch_field(document):
    document["spec"]["arms"][1]["patch"] = {"model": {"position": "spiral"}}
    assert refusal(copy.deepcopy(document)).startswith("spec.arms[1].patch.model.position: Input should be 'alibi'")
    document["spec"]["arms"][1]["patch"] = {"model": {"hiddenSize": 66}}
    assert refusal(copy.deepcopy(document)) == ("spec.arms[1].patch.model: hiddenSize (66) must be divisible by "
                                                "numHeads (4)")
    document["spec"]["arms"][1]["patch"] = {"model": {"hiddenSizes": 66}}
    assert refusal(copy.deepcopy(document)) == "spec.arms[1].patch.model.hiddenSizes: unknown field"
    document["spec"]["arms"][1]["patch"] = {"training": {"globalBatchSize": "16"}}
    assert refusal(document).startswith("spec.arms[1].patch.training.globalBatchSize: Input should be a valid integer")


def test_an_invalid_merge_outside_the_patch_names_the_arm_and_the_merged_field(document):
    bad = copy.deepcopy(document)
    bad["spec"]["arms"][0]["patch"] = {"data": None}  # null deletes: the patch's field
    assert refusal(bad) == "spec.arms[0].patch.data: Field required"
    # A rule across sections (the spec's own), broken by the merge: the merged spec's field.
    document["spec"]["arms"][0]["patch"] = {"optim": {"warmupTokens": 10**6}}
    assert refusal(document).startswith("spec.arms[0] (alibi), merged onto spec.base: spec: optim.warmupTokens "
                                        "(1000000) is longer than the run")


def test_a_comparison_point_beyond_an_arms_run_is_refused(document):
    document["spec"]["arms"][1]["patch"]["training"] = {"trainTokens": None, "trainSteps": 100}
    assert refusal(document) == ("spec.compareAtTokens (163,840) is beyond the run of spec.arms[1] (rotary): "
                                 "training.trainSteps 100 x globalBatchSize 16 x seq 64 = 102,400 tokens")


def test_a_warmup_longer_than_the_comparison_is_refused_naming_the_arm(document):
    document["spec"]["base"]["training"]["trainTokens"] = 10 * document["spec"]["compareAtTokens"]
    document["spec"]["base"]["optim"]["warmupTokens"] = 2 * document["spec"]["compareAtTokens"]
    message = refusal(document)
    assert message.startswith("spec.arms[0] (alibi), trained to spec.compareAtTokens: spec: optim.warmupTokens "
                              "(327680) is longer than the run")


@pytest.mark.parametrize("where, value, message", [
    ("base", {"eval": {"tasks": ["bloomrun_arithmetic"]}}, "spec.base.eval: the study's evaluation is spec.eval"),
    ("base", {"budget": {"gpuHours": 5}}, "spec.base.budget: the study's budget is spec.budget"),
    ("patch", {"eval": {"limit": 5}}, "spec.arms[1].patch.eval: the study's eval is spec.eval"),
    ("patch", {"budget": {"gpuHours": 5}}, "spec.arms[1].patch.budget: the study's budget is spec.budget"),
])
def test_evaluation_and_budget_belong_to_the_study(document, where, value, message):
    if where == "base":
        document["spec"]["base"].update(value)
    else:
        document["spec"]["arms"][1]["patch"] = value
    assert refusal(document).startswith(message)


def test_arm_names_repeat_length_and_count(document):
    bad = copy.deepcopy(document)
    bad["spec"]["arms"][2]["name"] = "alibi"
    assert refusal(bad) == "spec.arms: arms[2].name 'alibi' repeats arms[0].name"
    bad = copy.deepcopy(document)
    bad["spec"]["arms"][2]["name"] = "a-name-that-is-twenty-four"
    assert refusal(bad) == ("spec.arms[2].name: the arm's run 'study-position-a-name-that-is-twenty-four' is "
                            "longer than 40 characters (metadata.name + '-' + arm name); shorten either")
    bad = copy.deepcopy(document)
    bad["spec"]["arms"][2]["name"] = "No_Dns"
    assert refusal(bad).startswith("spec.arms.2.name: String should match pattern")
    bad = copy.deepcopy(document)
    bad["spec"]["arms"] = [{"name": f"a{i}", "patch": {"model": {"numLayers": i + 1}}} for i in range(17)]
    assert refusal(bad).startswith("spec.arms: List should have at most 16 items")
    bad["spec"]["arms"] = bad["spec"]["arms"][:1]
    assert refusal(bad).startswith("spec.arms: List should have at least 2 items")


def test_structural_errors_name_the_field(document):
    bad = copy.deepcopy(document)
    bad["kind"] = "BloomRun"
    assert refusal(bad) == "kind: expected 'BloomStudy', got 'BloomRun'"
    bad = copy.deepcopy(document)
    del bad["spec"]["compareAtTokens"]
    assert refusal(bad) == "spec.compareAtTokens: Field required"
    bad = copy.deepcopy(document)
    bad["spec"]["base"]["model"]["position"] = "spiral"
    assert refusal(bad).startswith("spec.base.model.position: Input should be")
    bad = copy.deepcopy(document)
    bad["spec"]["eval"] = {"tasks": ["nope"]}
    assert refusal(bad).startswith("spec.eval.tasks.0: Input should be")
    bad = copy.deepcopy(document)
    bad["spec"]["maxConcurrent"] = 0
    assert refusal(bad).startswith("spec.maxConcurrent: Input should be greater than or equal to 1")


def test_load_study_names_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("apiVersion: bloomrun.io/v1alpha1\nkind: BloomStudy\nkind: BloomRun\n")
    with pytest.raises(StudyError, match=r"s.yaml: line 3, column 1: invalid YAML: duplicate key 'kind'"):
        load_study(path)
    with pytest.raises(StudyError, match="nope.yaml: no such file"):
        load_study(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------- comparison


def test_compare_names_the_best_and_whether_its_lead_exceeds_the_stderr():
    arms = [ArmStatus(name="a", mean=0.50, stderr=0.01), ArmStatus(name="b", mean=0.53, stderr=0.01),
            ArmStatus(name="c", mean=0.40, stderr=0.01), ArmStatus(name="d")]
    result = compare(arms)
    assert (result.best, result.runner_up) == ("b", "a")
    assert result.lead == pytest.approx(0.03) and result.stderr == pytest.approx(0.01414, abs=1e-5)
    assert result.exceeds_stderr is True
    assert result.verdict == ("best arm: b, +0.0300 mean acc over a, which exceeds the evaluation's standard "
                              "error (0.0141)")
    arms[1].mean = 0.51
    assert compare(arms).exceeds_stderr is False
    assert compare(arms).verdict == ("best arm: b, +0.0100 mean acc over a, which is within the evaluation's "
                                     "standard error (0.0141)")
    assert compare([ArmStatus(name="d")]) is None


def test_equal_means_are_a_tie_that_names_no_best_arm():
    result = compare([ArmStatus(name="alibi", mean=0.5, stderr=0.04), ArmStatus(name="rotary", mean=0.5, stderr=0.07)])
    assert (result.lead, result.exceeds_stderr) == (0.0, False)
    assert result.verdict == describe(result) == "best arm: none, alibi and rotary tie at the comparison point"


def test_without_a_stderr_the_lead_is_not_judged():
    result = compare([ArmStatus(name="alibi", mean=0.55, stderr=0.01), ArmStatus(name="rotary", mean=0.5)])
    assert (result.best, result.stderr, result.exceeds_stderr) == ("alibi", None, None)
    assert result.verdict == "best arm: alibi, +0.0500 over rotary (no stderr to compare with)"
    only = compare([ArmStatus(name="alibi", mean=0.55)])
    assert only.verdict == "best arm: alibi (the only one scored)" and only.runner_up is None
    assert describe(None) == "best arm: none scored at the comparison point yet"


def test_the_spec_module_stays_torch_free():
    import subprocess
    import sys

    code = "import sys, bloomrun.study.spec; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", study_spec.__file__


# ------------------------------------------------------------------ the cluster example

CLUSTER_EXAMPLE = EXAMPLE.parent / "study-position-1b3.yaml"


def test_the_1b3_cluster_example_is_the_papers_position_ablation_within_its_budget():
    study = load_study(CLUSTER_EXAMPLE)
    spec = study.spec
    specs = arm_specs(spec)
    assert {name: run.model.position for name, run in specs.items()} == \
        {"alibi": "alibi", "rotary": "rotary", "learned": "learned"}
    assert count_parameters(specs["alibi"].model) == pytest.approx(1.3e9, rel=0.05)
    # The budget covers the paper's estimate of every arm to the comparison point, with the
    # learned arm's extra position table counted (the tokens are those of the first step that
    # reaches the comparison point, a fraction of a batch past it).
    costs = arm_costs(spec)
    for name, run in specs.items():
        assert costs[name] == pytest.approx(gpu_hours(count_parameters(run.model), spec.compare_at_tokens, 150),
                                            rel=1e-4)
    assert costs["learned"] > costs["alibi"] == costs["rotary"]
    assert spec.compare_at_tokens == 112_000_000_000 and sum(costs.values()) <= spec.budget.gpu_hours
    assert sum(budget_shares(spec).values()) == pytest.approx(spec.budget.gpu_hours)
    # Each arm is a BloomRun the API server's rules accept (the world-size rule for every
    # node count and ramp stage included), reading its data from the data volume.
    mount = specs["alibi"].data_volume.mount_path
    for name in specs:
        run = parse_manifest(arm_manifest(study, name)).spec
        assert world_size_refusals(run) == []
        assert run.budget.gpu_hours == pytest.approx(budget_shares(spec)[name])
        paths = [run.data.tokenizer, run.eval.task_data_dir] + [source.path for source in run.data.sources]
        assert all(path.startswith(mount + "/") for path in paths), paths
