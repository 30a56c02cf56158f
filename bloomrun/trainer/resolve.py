"""The one rule from a validated config to the one the workers read. Pure: config in,
resolved config out (pydantic `model_copy`, nothing validated again, no file looked at).

Every launcher calls it: `bloomctl run` (paths next to the manifest, checkpoints in the
local run folder), the operator (paths inside the data volume, checkpoints on the
checkpoint volume) and `bloomctl export` (a manifest's tokenizer). The launcher alone
decides checkpoint.dir: a BloomRun refuses it (bloomrun.operator.spec).
"""

from __future__ import annotations

from pathlib import PurePath

import yaml

from bloomrun.trainer.config import DataConfig, InitFrom, TrainerConfig


def resolve_path(path: str, base_dir: str | PurePath) -> str:
    """A relative path means relative to `base_dir`; an absolute one stays as it is."""
    return str(path if PurePath(path).is_absolute() else PurePath(base_dir) / path)


def resolve_data(data: DataConfig, base_dir: str | PurePath) -> DataConfig:
    """Every source's path and the tokenizer's, made absolute against `base_dir`."""
    sources = [s.model_copy(update={"path": resolve_path(s.path, base_dir)}) for s in data.sources]
    tokenizer = resolve_path(data.tokenizer, base_dir) if data.tokenizer else data.tokenizer
    return data.model_copy(update={"sources": sources, "tokenizer": tokenizer})


def resolve_init_from(init_from: InitFrom | None, base_dir: str | PurePath,
                      runs_root: str | PurePath | None) -> InitFrom | None:
    """A warm start's source as the path the workers read: `run` becomes that run's folder
    under `runs_root` (where the launcher keeps every run's folder), a relative `path` is
    taken against `base_dir` like the data paths."""
    if init_from is None:
        return None
    if init_from.run is not None:
        if runs_root is None:
            raise ValueError("checkpoint.initFrom.run: this launcher keeps no other runs' folders; give a path")
        return init_from.model_copy(update={"path": str(PurePath(runs_root) / init_from.run), "run": None})
    return init_from.model_copy(update={"path": resolve_path(init_from.path, base_dir)})


def resolve_config(
    config: TrainerConfig,
    *,
    base_dir: str | PurePath,
    checkpoint_dir: str | PurePath | None = None,
    runs_root: str | PurePath | None = None,
    metrics_port: int | None = None,
    train_steps: int | None = None,
) -> TrainerConfig:
    """The config the workers read: data paths against `base_dir`, and what the launcher
    decides: the checkpoint folder (and `runs_root`, where the folders of the runs a warm
    start may name live), optionally the metrics port and a run length in steps (which
    replaces a token budget)."""
    update: dict = {"data": resolve_data(config.data, base_dir)}
    init_from = resolve_init_from(config.checkpoint.init_from, base_dir, runs_root)
    checkpoint = {"init_from": init_from} if init_from is not None else {}
    if checkpoint_dir is not None:
        checkpoint["dir"] = str(checkpoint_dir)
    if checkpoint:
        update["checkpoint"] = config.checkpoint.model_copy(update=checkpoint)
    if metrics_port is not None:
        assert 0 <= metrics_port <= 65535, metrics_port
        update["metrics"] = config.metrics.model_copy(update={"port": metrics_port})
    if train_steps is not None:
        if train_steps < 1:
            raise ValueError(f"train steps must be at least 1, got {train_steps}")
        update["training"] = config.training.model_copy(update={"train_steps": train_steps, "train_tokens": None})
    return config.model_copy(update=update)


def config_yaml(config: TrainerConfig) -> str:
    """The file the workers read (`--config`), in the manifest's camelCase keys: the
    ConfigMap's config.yaml in a pod, runs/NAME/config.yaml for bloomctl run."""
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)
