"""`bloomctl export`: the newest complete checkpoint of a run becomes a directory that
transformers' BloomForCausalLM loads and that gives our model's logits."""

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer, BloomForCausalLM

from bloomrun.cli.main import main
from bloomrun.operator.spec import load_manifest
from bloomrun.trainer import checkpoint as ckpt
from bloomrun.trainer.resolve import resolve_config
from bloomrun.trainer.model import Bloom, build_model
from tests.cli.elastic_harness import REPO, tiny_manifest


def publish(checkpoints, model: Bloom, step: int):
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    moments = {f"{name}.{key}": torch.zeros_like(p) for name, p in weights.items() for key in ("exp_avg", "exp_avg_sq")}
    state = ckpt.TrainState(step=step, consumed_samples=16 * step, tokens=1024 * step)
    return ckpt.publish(checkpoints, state, weights, moments, {"torch": torch.get_rng_state()})


@pytest.fixture
def run_dir(tmp_path):
    """runs/tiny as `bloomctl run` leaves it: config.yaml and checkpoints at steps 10, 20
    and a newest one (30) whose weights file was damaged."""
    config = load_manifest(tiny_manifest(tmp_path, steps=30, every=10)).spec.trainer_config()
    run = tmp_path / "runs" / "tiny"
    config = resolve_config(config, base_dir=tmp_path, checkpoint_dir=run / "checkpoints", metrics_port=0)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(json.dumps(config.model_dump(mode="json", by_alias=True)))
    torch.manual_seed(0)
    models = {}
    for step in (10, 20, 30):
        model = build_model(config.model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))  # not the init: LayerNorms and biases too
        models[step] = model
        publish(run / "checkpoints", model, step)
    damaged = run / "checkpoints" / "step-00000030" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-64])
    return run, models


def test_export_of_a_run_takes_the_newest_complete_checkpoint_and_matches_our_logits(run_dir, tmp_path, capsys):
    run, models = run_dir
    out = tmp_path / "hf"
    assert main(["export", str(run), "--output", str(out)]) == 0
    assert "exported step 20" in capsys.readouterr().out  # step 30 fails its checksum
    hf = BloomForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 1000, (2, 37), generator=torch.Generator().manual_seed(1))
    ours = models[20].eval()
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4
        assert (hf(ids).logits - models[10](ids)).abs().max().item() > 1e-2  # and not another step's


def test_export_ships_the_runs_tokenizer_with_blooms_special_tokens(run_dir, tmp_path):
    run, _ = run_dir
    out = tmp_path / "hf"
    assert main(["export", str(run / "checkpoints"), "--output", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("</s>")
    text = "Once upon a time, 12 + 7 = 19."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert max(tokenizer(text)["input_ids"]) < config["vocab_size"]
    assert tokenizer.model_max_length == 64  # the tiny preset's sequence length


def test_export_of_one_step_with_a_manifest_for_the_config(run_dir, tmp_path):
    run, models = run_dir
    (run / "config.yaml").unlink()
    out = tmp_path / "hf10"
    step = run / "checkpoints" / "step-00000010"
    assert main(["export", str(step), "--output", str(out), "--config", str(REPO / "examples" / "tiny.yaml")]) == 0
    hf = BloomForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(50).reshape(1, 50)
    with torch.no_grad():
        assert (hf(ids).logits - models[10].eval()(ids)).abs().max().item() <= 1e-4
    assert (out / "tokenizer.json").is_file()  # found relative to the manifest


def test_export_errors_are_one_line_exit_2(run_dir, tmp_path, capsys):
    run, _ = run_dir
    assert main(["export", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == f"bloomctl export: error: {tmp_path / 'nope'}: no such run folder or checkpoint"

    empty = tmp_path / "empty" / "checkpoints"
    empty.mkdir(parents=True)
    shutil.copy(run / "config.yaml", empty.parent / "config.yaml")
    assert main(["export", str(empty.parent), "--output", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == f"bloomctl export: error: {empty}: no complete checkpoint"

    assert main(["export", str(run / "checkpoints" / "step-00000030"), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-00000030/model.safetensors" in err[0] and "metadata says" in err[0]

    config = json.loads((run / "config.yaml").read_text())
    config["model"]["position"] = "rotary"
    (run / "config.yaml").write_text(json.dumps(config))
    assert main(["export", str(run), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.position" in err[0]
    assert not (tmp_path / "x").exists()
