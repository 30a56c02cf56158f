"""Export to (and import from) Hugging Face's BloomForCausalLM format.

The export is what lm-evaluation-harness and `BloomForCausalLM.from_pretrained(dir)` load:
`model.safetensors` + `config.json`. Our parameter names are HF's without the
`transformer.` prefix, so the mapping is a prefix; the LM head is tied to the word
embeddings and, as in BigScience's released checkpoints, not stored. Only the variant HF
can represent exports (ALiBi, embedding LayerNorm, GELU); the other ablations raise a
ValueError naming the knob. Weights are read and written with safetensors only: nothing is
ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from bloomrun.trainer.config import ModelConfig
from bloomrun.trainer.model import Bloom, ModelArgs

HF_PREFIX = "transformer."
HF_LM_HEAD = "lm_head.weight"
TIED_EMBEDDING = "word_embeddings.weight"
# Prefixes wrappers put in front of the model's own names (DDP/DeepSpeed, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def check_exportable(model_cfg: ModelConfig) -> None:
    """Raise ValueError naming each ablation knob HF's BLOOM cannot represent."""
    problems = []
    if model_cfg.position != "alibi":
        problems.append(f"model.position is {model_cfg.position!r} (HF BLOOM has only 'alibi')")
    if not model_cfg.embedding_layernorm:
        problems.append("model.embeddingLayernorm is false (HF BLOOM always applies it)")
    if model_cfg.activation != "gelu":
        problems.append(f"model.activation is {model_cfg.activation!r} (HF BLOOM has only 'gelu')")
    if problems:
        raise ValueError("cannot export to BloomForCausalLM: " + "; ".join(problems))


def hf_config(model_cfg: ModelConfig, dtype: torch.dtype = torch.float32, **token_ids: int | None) -> dict:
    """config.json for BloomForCausalLM; token_ids: bos_token_id, eos_token_id, pad_token_id.

    vocab_size is the padded vocabulary: the embedding matrix has that many rows.
    """
    check_exportable(model_cfg)
    unknown = set(token_ids) - {"bos_token_id", "eos_token_id", "pad_token_id"}
    if unknown:
        raise ValueError(f"unknown token id keys: {sorted(unknown)}")
    shape = model_cfg.shape()
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["BloomForCausalLM"],
        "model_type": "bloom",
        "n_layer": shape.num_layers,
        "n_head": shape.num_heads,
        "hidden_size": shape.hidden_size,
        "vocab_size": model_cfg.padded_vocab_size,
        "layer_norm_epsilon": model_cfg.layer_norm_epsilon,
        "initializer_range": model_cfg.init_std,
        "apply_residual_connection_post_layernorm": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "slow_but_exact": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "seq_length": shape.seq_length,
        # transformers 5 reads "dtype", earlier versions "torch_dtype".
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
        "bos_token_id": token_ids.get("bos_token_id"),
        "eos_token_id": token_ids.get("eos_token_id"),
        "pad_token_id": token_ids.get("pad_token_id"),
    }


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        out[name] = tensor
    return out


def hf_state_dict(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights under HF's names (`transformer.h.0....`); the tied lm_head is left out."""
    state_dict = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    return {HF_PREFIX + name: tensor for name, tensor in strip_wrapper_prefixes(state_dict).items()}


def load_hf_state_dict(model: nn.Module, hf_sd: Mapping[str, torch.Tensor]) -> None:
    """Load an HF BLOOM state dict into our model; every name and shape must match.

    A stored `lm_head.weight` is accepted only if it equals the word embeddings (tied).
    """
    ours: dict[str, torch.Tensor] = {}
    foreign = []
    for name, tensor in hf_sd.items():
        if name == HF_LM_HEAD:
            continue
        if not name.startswith(HF_PREFIX):
            foreign.append(name)
            continue
        ours[name.removeprefix(HF_PREFIX)] = tensor
    if HF_LM_HEAD in hf_sd and TIED_EMBEDDING in ours and not torch.equal(hf_sd[HF_LM_HEAD], ours[TIED_EMBEDDING]):
        raise ValueError("lm_head.weight differs from the word embeddings: untied heads are not supported")
    check_fits(model.state_dict(), ours, "HF state dict does not fit this model", foreign)
    model.load_state_dict(ours, strict=True)


def shorten(names: list[str], limit: int = 8) -> str:
    """The first few names and how many more: a wrong file can miss thousands."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_fits(
    expected: Mapping[str, torch.Tensor],
    given: Mapping[str, torch.Tensor],
    what: str,
    foreign: list[str] = (),
) -> None:
    """Raise one ValueError listing every missing, unexpected and mis-shaped tensor (HF names)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(list(foreign) + [HF_PREFIX + n for n in set(given) - set(expected)])
    mismatched = [
        f"{HF_PREFIX}{n}: {tuple(given[n].shape)} vs model {tuple(expected[n].shape)}"
        for n in sorted(set(given) & set(expected))
        if given[n].shape != expected[n].shape
    ]
    parts = [
        f"{label} {shorten(names)}"
        for label, names in (
            ("missing", [HF_PREFIX + n for n in missing]),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        )
        if names
    ]
    if parts:
        raise ValueError(f"{what}: " + "; ".join(parts))


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def export_hf(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    out_dir: str | os.PathLike,
    **token_ids: int | None,
) -> Path:
    """Write model.safetensors and config.json for `BloomForCausalLM.from_pretrained(out_dir)`.

    Accepts the model or its state dict (our names, optionally behind module./_orig_mod.).
    The weights keep their dtype; config.json records it.
    """
    check_exportable(model_cfg)
    tensors = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in hf_state_dict(model_or_state_dict).items()
    }
    # Names and shapes against the model the config describes (built on the meta device: no
    # memory), so a checkpoint exported with the wrong config fails here, not in from_pretrained.
    with torch.device("meta"):
        expected = Bloom(ModelArgs.from_config(model_cfg)).state_dict()
    ours = {name.removeprefix(HF_PREFIX): tensor for name, tensor in tensors.items()}
    check_fits(expected, ours, "weights do not fit the model config")
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"state dict mixes dtypes {sorted(map(str, dtypes))}; cast it to one first")
    config = hf_config(model_cfg, dtype=dtypes.pop(), **token_ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # "format: pt" is what transformers checks before it trusts a safetensors file.
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    # safetensors creates its file 0600 (seen with 0.4+); the rest of the export is written
    # with the process umask, and a model directory shared for evaluation must be readable.
    os.chmod(out / "model.safetensors", 0o666 & ~current_umask())
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
