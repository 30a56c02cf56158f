"""bloomctl study's commands on bad input: one line naming the field or file, exit code 2,
nothing written; and status on a manifest before anything ran."""

from pathlib import Path

import yaml

from bloomrun.cli.main import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "study-position.yaml"


def test_a_refused_study_is_one_line_exit_2_and_no_folder(tmp_path, monkeypatch, capsys):
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["budget"]["gpuHours"] = 1e-7
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(document))
    monkeypatch.chdir(tmp_path)
    assert main(["study", "run", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bloomctl study: error: {manifest}: spec.budget.gpuHours (1e-07) is below the arms' "
                          "estimated cost") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
    assert main(["study", "run", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == f"bloomctl study: error: {tmp_path / 'nope.yaml'}: no such manifest file\n"


def test_status_and_report_name_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["study", "status", "nope"]) == 2
    assert capsys.readouterr().err == "bloomctl study: error: nope: no such study folder or manifest\n"
    (tmp_path / "empty").mkdir()
    assert main(["study", "report", "empty"]) == 2
    assert "empty: not a study folder (no study.yaml); run bloomctl study run first" in capsys.readouterr().err
    assert main(["study", "report", "study-position"]) == 2
    assert capsys.readouterr().err == ("bloomctl study: error: study-position: no such study folder "
                                       "(nor runs/study-position)\n")


def test_status_of_a_manifest_before_it_ran(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["study", "status", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"study study-position: {tmp_path / 'runs' / 'study-position'}"
    assert [line.split()[:2] for line in out[2:5]] == [["alibi", "Pending"], ["rotary", "Pending"], ["none", "Pending"]]
