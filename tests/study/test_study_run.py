"""`bloomctl study run` end to end on a 3-arm tiny study (alibi / rotary / none): killed during
its first arm, run again (the arm resumes, the others train), then `study status` and `study
report`, whose numbers must be the run folders' own, and a third run that trains and scores
nothing."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from bloomrun.trainer.checkpoint_layout import step_dir_name
from tests.cli.elastic_harness import BLOOMCTL, DEMO_DATA, Started, launcher_env, wait_until

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "study-position.yaml"
ARMS = ("alibi", "rotary", "none")
STEP_TOKENS = 16 * 64
STEPS, EVERY = 30, 10  # checkpoints at 10, 20, 30; keepLast 2 deletes step 10 before it is scored
SVG = "{http://www.w3.org/2000/svg}"


def study_manifest(tmp: Path) -> Path:
    document = yaml.safe_load(EXAMPLE.read_text())
    spec = document["spec"]
    spec["compareAtTokens"] = STEPS * STEP_TOKENS
    spec["eval"] = {"tasks": ["bloomrun_stories_order", "bloomrun_arithmetic"], "limit": 20, "batchSize": 32}
    base = spec["base"]
    base["data"]["tokenizer"] = str(DEMO_DATA / "tokenizer.json")
    for source in base["data"]["sources"]:
        source["path"] = str(DEMO_DATA / Path(source["path"]).name)
    base["optim"]["warmupTokens"] = 10 * STEP_TOKENS
    base["training"]["trainTokens"] = STEPS * STEP_TOKENS
    base["checkpoint"] = {"everySteps": EVERY, "keepLast": 2}
    base["metrics"] = {"logEvery": EVERY}
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def run(*argv, cwd: Path, env=None, timeout=900):
    import subprocess

    done = subprocess.run([BLOOMCTL, *argv], cwd=cwd, env=env or launcher_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def table(text: str) -> dict[str, list[str]]:
    """`study status`'s rows by arm (columns split on runs of two spaces)."""
    import re

    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells and cells[0] in ARMS:
            rows[cells[0]] = cells
    return rows


def polyline_points(group: ET.Element) -> int:
    """Vertices of the first path in an SVG group (matplotlib writes a line as M x y L x y ...)."""
    path = next(group.iter(f"{SVG}path"))
    return path.get("d").count("L") + 1


def exited_early(started: Started) -> None:
    if started.proc.poll() is not None:
        raise AssertionError(f"bloomctl study run exited {started.proc.returncode}:\n{started.tail()}")


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_study_run_resumes_then_status_and_report_hold_the_run_folders_numbers(tmp_path):
    manifest = study_manifest(tmp_path)
    out = tmp_path / "out"
    common = ["--output", str(out), "--nproc", "1"]

    # 1. Killed outright in the first arm, after its step-20 checkpoint.
    env = launcher_env() | {"BLOOMRUN_TEST_HANG_AFTER_STEP": "20"}
    first = Started([BLOOMCTL, "study", "run", str(manifest), *common], tmp_path / "first.log", env=env, cwd=tmp_path)
    try:
        alibi = out / "arms" / "alibi" / "checkpoints"
        wait_until(lambda: (alibi / step_dir_name(20) / "metadata.json").is_file(), timeout=600,
                   what="alibi's step-20 checkpoint", check=lambda: exited_early(first))
    finally:
        first.kill_all()
    assert not (alibi / step_dir_name(30)).exists()

    # 2. The same command: alibi resumes from step 20, the other arms train, every arm is scored.
    output = run("study", "run", str(manifest), *common, cwd=tmp_path, timeout=1800)
    assert "[1/3] alibi: model.position=alibi" in output and "[3/3] none: model.position=none" in output
    assert output.count("resumed from") == 1 and "step 20" in output.split("resumed from")[1].splitlines()[0]
    assert output.count("no complete checkpoint") == 2
    for arm in ARMS:
        assert f"{arm}: step 10 not scored: checkpoint.keepLast deleted it" in output
        assert f"{arm}: step 30 ({STEPS * STEP_TOKENS:,} tokens) scored: mean acc" in output

    folders = {arm: out / "arms" / arm for arm in ARMS}
    truth = {}
    for arm, folder in folders.items():
        history = [json.loads(line) for line in (folder / "checkpoints" / "history.jsonl").read_text().splitlines()]
        assert [p["step"] for p in history] == [10, 20, 30]  # step 10 outlived its checkpoint here
        assert not (folder / "checkpoints" / step_dir_name(10)).exists()
        meta = json.loads((folder / "checkpoints" / step_dir_name(30) / "metadata.json").read_text())
        assert history[-1]["loss"] == meta["loss"] and meta["tokens"] == STEPS * STEP_TOKENS
        results = json.loads((folder / "checkpoints" / f"{step_dir_name(30)}.eval.json").read_text())
        assert (folder / "checkpoints" / f"{step_dir_name(20)}.eval.json").is_file()
        truth[arm] = (meta["loss"], results["bloomrun"]["summary"])
        arm_run = yaml.safe_load((folder / "arm.yaml").read_text())
        assert arm_run["spec"]["model"]["position"] == arm and arm_run["metadata"]["name"] == f"study-position-{arm}"

    # 3. study status: the folders' numbers.
    rows = table(run("study", "status", str(out), cwd=tmp_path))
    for arm, (loss, summary) in truth.items():
        assert rows[arm][1:3] == ["Succeeded", f"{STEPS * STEP_TOKENS:,}"]
        assert rows[arm][4:7] == [f"{loss:.4f}", f"{summary['mean']:.4f}", f"{summary['normalisedMean']:.4f}"]

    # 4. study report: the table and the plots.
    run("study", "report", str(out), cwd=tmp_path)
    report = out / "report"
    markdown = (report / "report.md").read_text()
    lines = [line.split(" | ") for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    header = [cell.strip("| ") for cell in lines[0]]
    for line in lines[1:]:
        row = dict(zip(header, (cell.strip("| ") for cell in line)))
        loss, summary = truth[row["arm"]]
        assert row["mean acc"] == f"{summary['mean']:.4f}"
        assert row[f"loss at {STEPS * STEP_TOKENS:,} tokens"] == f"{loss:.4f}"
        for task in ("bloomrun_stories_order", "bloomrun_arithmetic"):
            assert row[task] == f"{summary['tasks'][task]['value']:.4f}"
    means = sorted(((summary["mean"], arm) for arm, (_, summary) in truth.items()), reverse=True)
    if means[0][0] == means[1][0]:
        assert "**best arm: none, " in markdown and " tie at the comparison point**" in markdown
    else:
        assert f"**best arm: {means[0][1]}, " in markdown and "the evaluation's standard error" in markdown
    html = (report / "report.html").read_text()
    assert html.count("<svg") == 2 and all(f"<td>{arm}</td>" in html for arm in ARMS)
    for name, points in (("loss", 3), ("accuracy", 2)):
        png = (report / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
        svg = ET.parse(report / f"{name}.svg").getroot()
        groups = {g.get("id"): g for g in svg.iter(f"{SVG}g") if g.get("id")}
        texts = " ".join("".join(t.itertext()) for t in svg.iter(f"{SVG}text"))
        for arm in ARMS:
            assert polyline_points(groups[f"{name}-{arm}"]) == points, (name, arm)
            assert arm in texts
    results = json.loads((report / "results.json").read_text())
    assert results["curves"]["none"]["loss"][-1] == [STEPS * STEP_TOKENS, truth["none"][0]]

    # 5. Once more: nothing trained, nothing scored again.
    scored = {p: p.stat().st_mtime_ns for p in out.glob("arms/*/checkpoints/*.eval.json")}
    again = run("study", "run", str(manifest), *common, cwd=tmp_path)
    assert again.count("already complete at step 30") == 3
    assert "scoring" not in again and "/30 | loss" not in again
    assert {p: p.stat().st_mtime_ns for p in out.glob("arms/*/checkpoints/*.eval.json")} == scored
