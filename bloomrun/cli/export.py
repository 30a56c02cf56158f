"""`bloomctl export PATH --output DIR`: the newest complete checkpoint as a Hugging Face
BloomForCausalLM directory (model.safetensors + config.json, plus the tokenizer when the
run names one), which `from_pretrained` and lm-evaluation-harness load.

PATH is a run folder (runs/<name>, as `bloomctl run` writes it), its checkpoints/ folder,
or one step-N checkpoint. The model's shape comes from the run's config.yaml beside
checkpoints/, or from --config (a BloomRun manifest or a trainer config).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from bloomrun.cli.main import UserError

METADATA = "metadata.json"  # bloomrun.trainer.checkpoint.METADATA, without importing torch here
RUN_CONFIG = "config.yaml"
# BLOOM's special tokens; the demo tokenizer uses the same ones.
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint as a Hugging Face BloomForCausalLM directory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", help="run folder, checkpoints folder or one step-N checkpoint")
    parser.add_argument("--output", required=True, help="directory to write the Hugging Face model to")
    parser.add_argument("--config", help="BloomRun manifest or trainer config (default: the run's config.yaml)")
    parser.set_defaults(func=export)


@dataclass(frozen=True)
class Source:
    """Where the checkpoint(s) and the run's config are."""

    checkpoints: Path | None  # a folder of step-N checkpoints: the newest complete one is used
    step_dir: Path | None  # or exactly this checkpoint
    config: Path


def locate(path: Path) -> Source:
    """Pure apart from looking at which files exist: what PATH means."""
    if not path.exists():
        raise UserError(f"{path}: no such run folder or checkpoint")
    if (path / METADATA).is_file() or path.name.startswith("step-"):
        return Source(None, path, path.parent.parent / RUN_CONFIG)
    if (path / "checkpoints").is_dir():
        return Source(path / "checkpoints", None, path / RUN_CONFIG)
    return Source(path, None, path.parent / RUN_CONFIG)


def load_config(path: Path):
    """The TrainerConfig in a BloomRun manifest or a trainer config file."""
    from pydantic import ValidationError

    from bloomrun.operator.spec import ManifestError, load_manifest
    from bloomrun.trainer.config import TrainerConfig, format_validation_error
    from bloomrun.trainer.resolve import resolve_config

    if not path.is_file():
        raise UserError(f"{path}: no such config (give --config MANIFEST)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
    if isinstance(raw, dict) and "apiVersion" in raw:
        try:
            config = load_manifest(path).spec.trainer_config()
        except ManifestError as err:
            raise UserError(str(err)) from None
        return resolve_config(config, base_dir=path.parent)  # as bloomctl run resolves it
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{path}: {format_validation_error(err)}") from None


def choose_checkpoint(source: Source) -> tuple[Path, dict]:
    from bloomrun.trainer import checkpoint as ckpt

    if source.step_dir is not None:
        try:
            return source.step_dir, ckpt.verify(source.step_dir)
        except ckpt.CheckpointError as err:
            raise UserError(str(err)) from None
    found = ckpt.newest_complete(source.checkpoints)
    if found is None:
        raise UserError(f"{source.checkpoints}: no complete checkpoint")
    return found


def export(args: argparse.Namespace) -> int:
    from bloomrun.trainer import checkpoint as ckpt
    from bloomrun.trainer.export import export_hf

    source = locate(Path(args.path))
    config = load_config(Path(args.config) if args.config else source.config)
    step_dir, meta = choose_checkpoint(source)
    try:
        weights = ckpt.read_tensors(step_dir, "model.safetensors")
        tokenizer = find_tokenizer(config)
        token_ids = special_token_ids(tokenizer) if tokenizer else {}
        out = export_hf(weights, config.model, args.output, **token_ids)
    except (ckpt.CheckpointError, ValueError) as err:  # e.g. an ablation HF cannot represent
        raise UserError(str(err)) from None
    if tokenizer:
        copy_tokenizer(tokenizer, out, config.model.shape().seq_length)
    print(f"exported step {meta['step']} of {step_dir} to {out}/ (BloomForCausalLM)")
    return 0


def find_tokenizer(config) -> Path | None:
    path = Path(config.data.tokenizer) if config.data.tokenizer else None
    return path if path and path.is_file() else None


def special_token_ids(tokenizer_file: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    ids = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        token_id = tokenizer.token_to_id(SPECIAL_TOKENS[key])
        if token_id is not None:
            ids[f"{key}_id"] = token_id
    return ids


def copy_tokenizer(tokenizer_file: Path, out: Path, seq_length: int) -> None:
    """tokenizer.json plus the small config that makes AutoTokenizer pick BLOOM's class.
    model_max_length is the trained sequence length: without it transformers assumes a
    huge one, and an evaluation harness would feed contexts the model never saw."""
    shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    settings = {"tokenizer_class": "BloomTokenizerFast", "model_max_length": seq_length, **SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
