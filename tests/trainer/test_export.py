"""Export to BloomForCausalLM's format (safetensors + config.json) and import from it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import BloomForCausalLM

from bloomrun.trainer.export import export_hf, hf_config, hf_state_dict, load_hf_state_dict
from bloomrun.trainer.model import Bloom, build_model
from tests.trainer.hf_helpers import model_cfg, random_hf_model


def trained_looking_model(cfg, seed=0) -> Bloom:
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, as after training
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def test_export_loads_with_from_pretrained_and_gives_the_same_logits(tmp_path):
    cfg = model_cfg(2, 96, 6)
    ours = trained_looking_model(cfg)
    export_hf(ours, cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    hf = BloomForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.dtype == torch.float32
    assert hf.lm_head.weight.data_ptr() == hf.transformer.word_embeddings.weight.data_ptr()  # tied
    ids = torch.randint(0, 300, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_config_json_describes_the_model(tmp_path):
    cfg = model_cfg(3, 64, 8, vocab_size=1000)
    export_hf(build_model(cfg), cfg, tmp_path, eos_token_id=0, pad_token_id=1)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == hf_config(cfg, eos_token_id=0, pad_token_id=1)
    assert config["model_type"] == "bloom" and config["architectures"] == ["BloomForCausalLM"]
    assert (config["n_layer"], config["n_head"], config["hidden_size"]) == (3, 8, 64)
    assert config["vocab_size"] == 1024  # padded
    assert config["eos_token_id"] == 0 and config["bos_token_id"] is None
    weights = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in weights
    assert weights["transformer.word_embeddings.weight"].shape == (1024, 64)
    assert set(weights) == set(hf_state_dict(build_model(cfg)))


def test_every_exported_file_is_written_with_the_umask_like_config_json(tmp_path):
    import os
    import stat

    cfg = model_cfg(1, 64, 4)
    previous = os.umask(0o022)
    try:
        export_hf(build_model(cfg), cfg, tmp_path)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}


def test_bf16_export_stays_bf16(tmp_path):
    cfg = model_cfg(1, 64, 4)
    export_hf(build_model(cfg).to(torch.bfloat16), cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert BloomForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16


def test_export_accepts_a_wrapped_state_dict(tmp_path):
    # DeepSpeed/DDP checkpoints name parameters module.<name>; torch.compile adds _orig_mod.
    cfg = model_cfg(1, 64, 4)
    ours = trained_looking_model(cfg)
    wrapped = {"module._orig_mod." + k: v for k, v in ours.state_dict().items()}
    export_hf(wrapped, cfg, tmp_path)
    reloaded = build_model(cfg)
    load_hf_state_dict(reloaded, load_file(tmp_path / "model.safetensors"))
    for name, tensor in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_round_trip_through_hf_names_is_exact():
    cfg = model_cfg(2, 64, 4)
    ours, fresh = trained_looking_model(cfg, seed=1), build_model(cfg)
    load_hf_state_dict(fresh, hf_state_dict(ours))
    for name, tensor in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "knob, value, message",
    [
        ("position", "rotary", "model.position is 'rotary'"),
        ("position", "learned", "model.position is 'learned'"),
        ("position", "none", "model.position is 'none'"),
        ("embedding_layernorm", False, "model.embeddingLayernorm is false"),
        ("activation", "swiglu", "model.activation is 'swiglu'"),
    ],
)
def test_variants_hf_cannot_represent_refuse_to_export(tmp_path, knob, value, message):
    cfg = model_cfg(1, 64, 4).model_copy(update={knob: value})
    with pytest.raises(ValueError, match=message):
        export_hf(build_model(cfg), cfg, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_export_refuses_weights_that_do_not_fit_the_config(tmp_path):
    small = model_cfg(1, 64, 4, vocab_size=300)
    with pytest.raises(ValueError, match=r"shape mismatch transformer\.word_embeddings\.weight: \(384, 64\) vs model \(1024, 64\)"):
        export_hf(build_model(small), model_cfg(1, 64, 4, vocab_size=1000), tmp_path)
    with pytest.raises(ValueError, match=r"missing transformer\.h\.1\.input_layernorm\.bias"):
        export_hf(build_model(small), model_cfg(2, 64, 4, vocab_size=300), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_import_checks_names_shapes_and_the_tied_head():
    cfg = model_cfg(2, 96, 6)
    hf_sd = random_hf_model(cfg).state_dict()
    load_hf_state_dict(build_model(cfg), hf_sd)  # HF's own state dict, lm_head included, loads

    untied = dict(hf_sd, **{"lm_head.weight": hf_sd["lm_head.weight"] + 1})
    with pytest.raises(ValueError, match="untied"):
        load_hf_state_dict(build_model(cfg), untied)

    missing = {k: v for k, v in hf_sd.items() if k != "transformer.h.1.mlp.dense_4h_to_h.bias"}
    with pytest.raises(ValueError, match=r"missing transformer\.h\.1\.mlp\.dense_4h_to_h\.bias"):
        load_hf_state_dict(build_model(cfg), missing)

    with pytest.raises(ValueError, match=r"unexpected transformer\.h\.2\.ln\.weight"):
        load_hf_state_dict(build_model(cfg), dict(hf_sd, **{"transformer.h.2.ln.weight": torch.ones(96)}))

    with pytest.raises(ValueError, match=r"shape mismatch transformer\.word_embeddings\.weight"):
        load_hf_state_dict(build_model(model_cfg(2, 96, 6, vocab_size=1000)), hf_sd)
