"""`bloomctl run` with bad input: one line naming the field or file, exit code 2, no
traceback, and nothing started (no run folder is even created)."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bloomrun.trainer.data import index_path
from tests.trainer.data_helpers import random_documents, write_dataset

REPO = Path(__file__).resolve().parents[2]
BLOOMCTL = str(Path(sys.executable).parent / "bloomctl")  # the installed entry point users run
TINY = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """Two small well-formed corpora and no tokenizer, in place of the demo's."""
    for seed, name in enumerate(("a", "b")):
        write_dataset(tmp_path / "data" / name, random_documents(20, 100, vocab=1000, seed=seed))
    return tmp_path


def manifest(corpus_dir: Path, edit=None) -> Path:
    document = copy.deepcopy(TINY)
    document["spec"]["data"] = {"sources": [{"path": "data/a", "weight": 1}, {"path": "data/b", "weight": 2}]}
    if edit:
        edit(document["spec"])
    path = corpus_dir / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def bloomctl_run(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BLOOMCTL, "run", str(path)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bloomctl run: error: ")
    for text in expected:
        assert text in lines[0]
    return lines[0]


def assert_nothing_started(cwd: Path) -> None:
    assert not (cwd / "runs").exists()


def set_in(path: str, value):
    def edit(spec):
        *parents, leaf = path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return edit


@pytest.mark.parametrize(
    "edit, expected",
    [
        (set_in("training.trainSteps", "many"), ["spec.training.trainSteps", "integer"]),
        (set_in("model.hiddenSizes", 64), ["spec.model.hiddenSizes", "unknown field"]),
        (set_in("model.hiddenSize", 66), ["spec.model", "hiddenSize (66)", "numHeads (4)"]),
        (set_in("training.zeroStage", 4), ["spec.training.zeroStage", "less than or equal to 3"]),
        (set_in("checkpoint.dir", "/elsewhere"), ["spec.checkpoint.dir", "set by the launcher"]),
    ],
    ids=["wrong-type", "unknown-field", "hidden-not-divisible-by-heads", "out-of-range", "checkpoint-dir"],
)
def test_an_invalid_manifest_names_the_field(corpus_dir, edit, expected):
    result = bloomctl_run(manifest(corpus_dir, edit), corpus_dir)
    assert_one_line_error(result, *expected)
    assert_nothing_started(corpus_dir)


def test_a_missing_data_file_is_named_before_any_worker_starts(corpus_dir):
    path = manifest(corpus_dir, set_in("data.sources", [{"path": "data/a"}, {"path": "data/nope"}]))
    line = assert_one_line_error(bloomctl_run(path, corpus_dir), "data.sources[1]", "nope")
    assert str(corpus_dir / "data" / "nope") in line
    assert_nothing_started(corpus_dir)


def test_a_corrupt_index_is_named_before_any_worker_starts(corpus_dir):
    idx = index_path(corpus_dir / "data" / "b")
    idx.write_bytes(b"not an index" + idx.read_bytes()[12:])
    line = assert_one_line_error(bloomctl_run(manifest(corpus_dir), corpus_dir), "data.sources[1]")
    assert f"{idx}" in line or "b.idx" in line
    assert_nothing_started(corpus_dir)


def test_a_missing_manifest_and_broken_yaml_are_one_line_errors(tmp_path):
    assert_one_line_error(bloomctl_run(tmp_path / "absent.yaml", tmp_path), "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: bloomrun.io/v1alpha1\nkind: BloomRun\nspec: [unclosed\n")
    assert_one_line_error(bloomctl_run(broken, tmp_path), "broken.yaml", "invalid YAML")
    assert_nothing_started(tmp_path)
