"""Reading what `bloomctl run` leaves in a run folder: the model from config.yaml, loss and
throughput from the checkpoints' metadata, and saying so when there is no throughput record."""

import json

import pytest
import yaml

from bloomrun.plan import runs
from bloomrun.plan.arithmetic import count_parameters
from bloomrun.trainer.config import ModelConfig, TrainerConfig
from bloomrun.trainer.resolve import config_yaml

MODEL = {"preset": "tiny", "numLayers": 3, "hiddenSize": 128, "numHeads": 4}


def write_run(folder, checkpoints, model=MODEL):
    """A run folder as bloomctl run writes it: config.yaml and checkpoints/step-N/metadata.json."""
    config = TrainerConfig(model=model, data={"sources": [{"path": "x"}]}, training={"trainSteps": 10})
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config_yaml(config))
    for meta in checkpoints:
        step = folder / "checkpoints" / f"step-{meta['step']:08d}"
        step.mkdir(parents=True)
        (step / "metadata.json").write_text(json.dumps({"format": 1, "files": {}, **meta}))
    return folder


def ckpt(step, tokens, at, loss=3.0, world_size=2, restarts=0):
    return {"step": step, "tokens": tokens, "published_at": at, "loss": loss, "world_size": world_size,
            "restarts": restarts}


def test_reads_the_model_and_checkpoints_in_step_order(tmp_path):
    run = runs.read_run(write_run(tmp_path / "arm", [ckpt(20, 2000, 120.0, 2.5), ckpt(10, 1000, 110.0, None)]))
    assert run.params == count_parameters(ModelConfig(**MODEL))
    assert run.shape == "3 x 128, 4 heads"
    assert [(c.step, c.tokens, c.loss) for c in run.checkpoints] == [(10, 1000, None), (20, 2000, 2.5)]
    points = runs.loss_points([run])
    assert [(p.compute, p.loss, p.run, p.step) for p in points] == [(6 * run.params * 2000, 2.5, "arm", 20)]


def test_throughput_is_tokens_over_time_between_checkpoints_of_one_life(tmp_path):
    run = runs.read_run(write_run(tmp_path / "arm", [
        ckpt(10, 1000, 100.0), ckpt(20, 3000, 110.0), ckpt(30, 5000, 120.0),
        ckpt(40, 7000, 500.0, restarts=1),  # resumed after a crash: the gap is not training time
        ckpt(50, 9000, 505.0, restarts=1),
    ]))
    measured = runs.measured_throughput(run)
    # (2000 + 2000 + 2000) tokens over (10 + 10 + 5) s.
    assert measured.tokens == 6000 and measured.gpu_seconds == pytest.approx(2 * 25.0)
    assert measured.described == "arm 240 tokens/s on 2 workers"
    assert measured.tflops_per_worker == pytest.approx(6 * run.params * 240.0 / 2 / 1e12)


def test_no_throughput_record_is_said_not_invented(tmp_path):
    single = runs.read_run(write_run(tmp_path / "one", [ckpt(10, 1000, 100.0)]))
    assert runs.measured_throughput(single) is None
    assert "no two checkpoints of one process life (1 checkpoint(s) on disk)" in runs.no_throughput_reason(single)
    across_restarts = runs.read_run(write_run(tmp_path / "two", [ckpt(10, 1000, 100.0),
                                                                 ckpt(20, 2000, 900.0, restarts=1)]))
    assert runs.measured_throughput(across_restarts) is None
    resized = runs.read_run(write_run(tmp_path / "resized", [ckpt(10, 1000, 100.0), ckpt(20, 2000, 110.0),
                                                             ckpt(30, 3000, 120.0, world_size=4)]))
    assert runs.measured_throughput(resized) is None
    assert "2 world sizes ([2, 4])" in runs.no_throughput_reason(resized)


def test_a_study_arms_history_keeps_the_points_keep_last_pruned(tmp_path):
    arm = write_run(tmp_path / "study" / "arms" / "alibi", [ckpt(30, 3000, 130.0, 2.0), ckpt(40, 4000, 140.0, 1.9)])
    (arm / "checkpoints" / "history.jsonl").write_text(
        '{"step": 10, "tokens": 1000, "loss": 3.0}\n{"step": 20, "tokens": 2000, "loss": 2.5}\n'
        '{"step": 30, "tokens": 3000, "loss": 2.0}\n{"step": 40, "tok')  # torn by a kill mid-write
    (run,) = runs.read_runs([tmp_path / "study"])  # the study's folder: its arms are found
    assert [(c.step, c.loss) for c in run.checkpoints] == [(10, 3.0), (20, 2.5), (30, 2.0), (40, 1.9)]
    assert [p.step for p in runs.loss_points([run])] == [10, 20, 30, 40]
    measured = runs.measured_throughput(run)  # only the two checkpoints carry time and world size
    assert measured.tokens == 1000 and measured.gpu_seconds == pytest.approx(2 * 10.0)


def test_a_study_folder_holds_run_folders(tmp_path):
    write_run(tmp_path / "study" / "alibi", [ckpt(10, 1000, 100.0)])
    write_run(tmp_path / "study" / "rotary", [ckpt(10, 1000, 100.0)])
    (tmp_path / "study" / "notes").mkdir()
    assert [r.name for r in runs.read_runs([tmp_path / "study"])] == ["alibi", "rotary"]
    with pytest.raises(runs.RunsError, match="neither a run folder"):
        runs.find_run_folders(tmp_path / "study" / "notes")
    with pytest.raises(runs.RunsError, match="no such folder"):
        runs.find_run_folders(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.yaml").write_text("model: {numLayers: -1}\n")
    with pytest.raises(runs.RunsError, match="not a readable trainer config"):
        runs.read_run(tmp_path / "broken")


def test_achieved_tflops_weights_runs_by_worker_seconds_and_names_those_without_a_record(tmp_path):
    write_run(tmp_path / "fast", [ckpt(10, 1000, 100.0), ckpt(20, 5000, 110.0, world_size=2)])
    write_run(tmp_path / "slow", [ckpt(10, 1000, 100.0, world_size=4), ckpt(20, 2000, 130.0, world_size=4)])
    write_run(tmp_path / "lone", [ckpt(10, 1000, 100.0)])
    found, missing = runs.throughputs([tmp_path])
    tflops, note = runs.achieved_tflops(found, missing, "h200")
    params = count_parameters(ModelConfig(**MODEL))
    assert tflops == pytest.approx(6 * params * (4000 + 1000) / (2 * 10 + 4 * 30) / 1e12)  # all FLOPs / all worker-s
    assert "from fast 400 tokens/s on 2 workers, slow 33 tokens/s on 4 workers" in note
    assert "holds if they ran on h200" in note and f"without a record: {tmp_path / 'lone'}: no two checkpoints" in note
    with pytest.raises(runs.RunsError, match="no throughput record: .*lone"):
        runs.achieved_tflops(*runs.throughputs([tmp_path / "lone"]), "h200")


def bloomrun_object(name, tokens, used, model=MODEL):
    return {"apiVersion": "bloomrun.io/v1alpha1", "kind": "BloomRun",
            "metadata": {"name": name, "namespace": "research", "uid": "u", "resourceVersion": "7"},
            "spec": {"model": model, "nodes": {"min": 4, "max": 4}, "gpusPerNode": 8},
            "status": {"phase": "Succeeded", "nodes": {"desired": 0, "ready": 0},
                       "progress": {"tokens": tokens, "tokensPerSecond": 1.0e6}, "gpuHours": {"used": used}}}


def test_a_finished_bloomrun_status_gives_tokens_per_gpu_hour(tmp_path):
    # kubectl get br -o yaml of two runs: one finished, one that never reported progress.
    listed = {"apiVersion": "v1", "kind": "List", "items": [
        bloomrun_object("ablation-alibi", tokens=112 * 10**9, used=2000.0),
        bloomrun_object("pending", tokens=None, used=0.0)]}
    (tmp_path / "runs.yaml").write_text(yaml.safe_dump(listed))
    found, missing = runs.throughputs([tmp_path / "runs.yaml"])
    (alibi,) = found
    params = count_parameters(ModelConfig(**MODEL))
    assert alibi.tflops_per_worker == pytest.approx(6 * params * 112e9 / (2000 * 3600) / 1e12)
    assert alibi.described == "research/ablation-alibi 112,000,000,000 tokens in 2,000.0 GPU-hours (its status)"
    assert missing == [f"{tmp_path / 'runs.yaml'}: no throughput record (status.progress.tokens None, "
                       "status.gpuHours.used 0.0)"]
    (tmp_path / "other.yaml").write_text("kind: ConfigMap\n")
    assert runs.throughputs([tmp_path / "other.yaml"]) == ([], [f"{tmp_path / 'other.yaml'}: not a BloomRun object"])
