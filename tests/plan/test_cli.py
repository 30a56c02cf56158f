"""`bloomctl plan` as a person runs it: the arithmetic on the terminal, the files it writes,
a shape that breaks a rule refused with the rule named, and the table in a real 80-column
terminal (tmux) without a wrapped or cut row."""

import re
import subprocess
from pathlib import Path

import pytest

from bloomrun.cli.main import main
from bloomrun.cli.plan import count, shape
from bloomrun.operator.spec import load_manifest
from bloomrun.plan import planner, rules
from tests.cli.elastic_harness import BLOOMCTL, REPO, launcher_env
from tests.cli.terminal import Tmux, find_tmux


def test_counts_and_shapes_parse():
    assert count("350B") == 350 * 10**9 and count("1.2T") == 1_200_000_000_000
    assert count("350e9") == 350 * 10**9 and count("366_000_000_000") == 366 * 10**9
    assert shape("70x14336x112") == (70, 14336, 112) and shape("70x14336") == (70, 14336, 112)
    for bad in ("lots", "0.5"):
        with pytest.raises(Exception, match="not a count|at least 1"):
            count(bad)
    with pytest.raises(Exception, match="not a shape"):
        shape("70-14336")


def test_one_million_a100_hours(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--gpu-hours", "1000000", "--gpu", "a100-80gb"]) == 0
    out = Path("runs") / "plans" / "bloom-final"  # the default, beside the runs git ignores
    printed = capsys.readouterr().out
    expected = planner.build_plan(planner.Request(gpu_hours=1e6, gpu="a100-80gb", tflops=150.0,
                                                  cluster=rules.Cluster(num_gpus=384)))
    chosen = expected.chosen
    assert "Candidates for 1,000,000 GPU-hours on a100-80gb (150 TFLOP/s, 384 GPUs, ZeRO 1)" in printed
    assert re.search(rf"^ \* opt +{chosen.label} ", printed, re.M), printed
    flat = " ".join(printed.split())  # rich wraps lines longer than the terminal
    for line in expected.arithmetic:
        assert " ".join(line.split()) in flat
    assert "budget C = 1,000,000 GPU-hours x 3600 s x 150 TFLOP/s (a100-80gb) = 5.400e+23 FLOPs" in printed
    manifest = out / "bloom-final.yaml"
    run = load_manifest(manifest)  # bloomctl validate's check
    assert run.spec.model.shape().num_layers == chosen.shape.num_layers
    assert run.spec.training.train_tokens == chosen.tokens
    assert {p.name for p in out.iterdir()} == {"bloom-final.yaml", "gpu-hours-vs-params.png", "gpu-hours-vs-params.svg"}
    assert f"wrote {manifest} (check it: bloomctl validate {manifest})" in " ".join(printed.split())


def test_a_shape_that_breaks_rules_names_them_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "plan"
    code = main(["plan", "--gpu-hours", "1161216", "--gpu", "a100-80gb", "--shape", "71x14300x109",
                 "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("bloomctl plan: error: shape 71x14300x109: hidden divisible by 128 "
                                   "(tensor-core tiles): hidden 14300 = 111 x 128 + 92")
    assert "layers + 2 divisible by PP (the embedding stages count as two layers" in captured.err
    assert "shape 71x14300x109 breaks BLOOM's rules:" in captured.out
    assert not out.exists()


def test_all_lists_every_candidate_and_whole_nodes_are_required(tmp_path, capsys):
    args = ["plan", "--gpu-hours", "1000000", "--gpu", "a100-80gb", "--output", str(tmp_path / "all")]
    assert main([*args, "--all"]) == 0
    printed = capsys.readouterr().out
    expected = planner.build_plan(planner.Request(gpu_hours=1e6, gpu="a100-80gb", tflops=150.0,
                                                  cluster=rules.Cluster(num_gpus=384)))
    rows = re.findall(r"^ .{0,12}?\b(\d+x\d+x\d+) ", printed, re.M)
    assert rows == [c.label for c in expected.candidates] and len(rows) > len(expected.shown())
    assert f"{len(expected.candidates)} candidate(s) obey BLOOM's rules and fit in memory; all shown." in printed
    # 12 GPUs are not whole nodes of 8: refused before anything is written.
    out = tmp_path / "twelve"
    code = main(["plan", "--gpu-hours", "1000", "--gpu", "a100-80gb", "--gpus", "12", "--global-batch", "1536",
                 "--aspect", "16", "256", "--hidden-multiple", "256", "--output", str(out)])
    assert code == 2 and "gpus (12) must be a whole number of nodes of 8" in capsys.readouterr().err
    assert not out.exists()


def test_tflops_from_a_run_without_a_record_says_so(tmp_path, capsys):
    run = tmp_path / "runs" / "tiny"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text((REPO / "examples" / "tiny.yaml").read_text().split("spec:\n", 1)[1]
                                     .replace("\n  ", "\n").lstrip())
    code = main(["plan", "--gpu-hours", "1000", "--gpu", "h200", "--tflops-from", str(run)])
    err = capsys.readouterr().err
    assert code == 2
    assert "--tflops-from: no throughput record:" in err and "no two checkpoints of one process life" in err


def test_unknown_gpu_is_refused_with_the_known_ones(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--gpu-hours", "1000", "--gpu", "v100"])
    assert "a100-40gb, a100-80gb, h100-80gb, h200" in capsys.readouterr().err.replace("'", "")


@pytest.fixture
def terminal(tmp_path):
    binary, env = find_tmux(REPO / ".cache")
    term = Tmux(binary, env, tmp_path / "tmux.sock")
    yield term
    term.close()


@pytest.mark.timeout(180)
def test_the_table_in_an_80_column_terminal(terminal, tmp_path):
    args = ["--gpu-hours", "1161216", "--gpu", "a100-80gb", "--min-tokens", "350B", "--shape", "70x14336x112"]
    terminal.start([BLOOMCTL, "plan", *args, "--output", "plan"], columns=80, rows=60,
                   cwd=tmp_path, env={})
    terminal.wait_for("EXIT=", 150)
    lines = terminal.scrollback()
    shown = "\n".join(lines)
    assert "EXIT=0" in shown, shown
    assert len(lines) == len(terminal.scrollback(joined=True)), f"a line wrapped:\n{shown}"
    assert "…" not in shown, f"a cell was cut:\n{shown}"
    plan = planner.build_plan(planner.Request(gpu_hours=1161216, gpu="a100-80gb", tflops=150.0,
                                              cluster=rules.Cluster(num_gpus=384), min_tokens=350 * 10**9,
                                              shapes=((70, 14336, 112),)))
    for c in plan.shown():  # every row whole: shape, size, GPU-hours, layout and memory
        row = next((line for line in lines if f" {c.label} " in line), None)
        assert row is not None, f"{c.label} missing:\n{shown}"
        assert f"{c.gpu_hours:,.0f}" in row and str(c.layout) in row and row.rstrip().endswith(f"{c.memory.total_gib:.1f}")
    bloom = plan.chosen
    assert bloom.label == "70x14336x112"
    assert re.search(rf"^ \* +70x14336x112 +176\.2B +444\.7B +1,161,212 +126\.0 +{bloom.layout} +"
                     rf"{bloom.memory.total_gib:.1f}$", shown, re.M), shown
    assert "GPU-hours = 8 x 1.7625e+11 x 4.4473e+11 / (150e12 x 3600) = 1,161,212;" in " ".join(shown.split())
    assert "wrote plan/bloom-final.yaml (check it: bloomctl validate plan/bloom-final.yaml)" in " ".join(shown.split())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_measured_throughput_and_fit_from_a_real_bloomctl_run(tmp_path):
    runs = tmp_path / "runs"
    env = launcher_env()
    trained = subprocess.run([BLOOMCTL, "run", str(REPO / "examples" / "tiny.yaml"), "--output", str(runs / "tiny"),
                              "--steps", "150"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    # Checkpoints every 50 steps: three of one process life, losses falling.
    planned = subprocess.run([BLOOMCTL, "plan", "--gpu-hours", "1e9", "--gpu", "a100-80gb", "--gpus", "8",
                              "--tflops-from", str(runs / "tiny"), "--runs", str(runs), "--output", str(tmp_path / "p")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert planned.returncode == 0, planned.stdout + planned.stderr
    out = " ".join(planned.stdout.split())
    assert re.search(r"measured \(6 x params x tokens / worker-seconds\) from tiny [\d,]+ tokens/s on 2 workers",
                     out), out
    assert "the records do not name the device" in out
    assert re.search(r"fit: loss = [\d.e+-]+ x C\^-[\d.]+ \(least squares in log space on 3 frontier points", out), out
    assert "predicted loss of the chosen model" in out
    assert (tmp_path / "p" / "loss-vs-compute.svg").is_file()
