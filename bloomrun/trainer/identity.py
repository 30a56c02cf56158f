"""Whose checkpoint is this, and can these weights be loaded here: pure, no I/O.

The paper's workflow is many arms that differ in one knob, sharing one checkpoint volume.
A run must resume only what it wrote itself: a second arm silently resuming the first arm's
weights (same parameter names, so it loads) voids the study's comparison. So each
checkpoint's metadata carries

- `run`: the identity of the run that wrote it. On a cluster that is (namespace, name, uid):
  the uid tells a run deleted and re-created under the same name from the old one, so the
  new one starts fresh instead of resuming weights trained under another spec. Locally it is
  the manifest's name (no uid);
- `compatibility`: the fields that make weights loadable (model shape and knobs, padded
  vocabulary) and the ones the exact-resume guarantee rests on (sequence length, data
  mixture, data seed), flat and human-readable, so a refusal names the fields that differ.

Warm starts (`checkpoint.initFrom`) load another run's weights on purpose: only the
weight fields must agree there.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import PurePath
from typing import Any

from bloomrun.trainer.config import TrainerConfig

RUN_ENV = ("BLOOMRUN_RUN_NAMESPACE", "BLOOMRUN_RUN_NAME", "BLOOMRUN_RUN_UID")


class IdentityError(Exception):
    """A checkpoint that belongs to another run or does not fit this one. Permanent: a
    restart would meet the same checkpoint."""


@dataclass(frozen=True)
class RunIdentity:
    name: str
    namespace: str | None = None  # None: a local run
    uid: str | None = None  # None: a local run (the run folder is its identity)

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{where} (uid {self.uid})" if self.uid else where

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "RunIdentity":
        return cls(name=raw["name"], namespace=raw.get("namespace"), uid=raw.get("uid"))


LOCAL_NAME_ENV = "BLOOMRUN_RUN"  # what `bloomctl run` sets: the manifest's name


def identity_from_env(environ: dict[str, str] | None = None, default_name: str = "local") -> RunIdentity:
    """The operator sets BLOOMRUN_RUN_{NAMESPACE,NAME,UID} in every worker; `bloomctl run`
    sets BLOOMRUN_RUN to the manifest's name; a trainer started by hand is `local`."""
    env = os.environ if environ is None else environ
    namespace, name, uid = (env.get(key) or None for key in RUN_ENV)
    return RunIdentity(name=name or env.get(LOCAL_NAME_ENV) or default_name, namespace=namespace, uid=uid)


def weight_fields(config: TrainerConfig) -> dict[str, Any]:
    """What decides whether one run's weights load into another's model."""
    model, shape = config.model, config.model.shape()
    fields = {
        "model.numLayers": shape.num_layers,
        "model.hiddenSize": shape.hidden_size,
        "model.numHeads": shape.num_heads,
        "model.paddedVocabSize": model.padded_vocab_size,
        "model.position": model.position,
        "model.embeddingLayernorm": model.embedding_layernorm,
        "model.activation": model.activation,
    }
    if model.position == "learned":  # a position embedding table of seqLength rows
        fields["model.seqLength"] = shape.seq_length
    return fields


def compatibility(config: TrainerConfig) -> dict[str, Any]:
    """`weight_fields` plus what the exact-resume guarantee needs: the same samples in the
    same order (data sources by file name and weight, data seed, sequence length)."""
    sources = [[PurePath(s.path).name, s.weight] for s in config.data.sources]
    return {
        **weight_fields(config),
        "model.seqLength": config.model.shape().seq_length,
        "data.sources": sources,
        "data.seed": config.data.seed,
    }


def differences(saved: dict[str, Any], ours: dict[str, Any], keys=None) -> list[str]:
    """`field: saved -> ours` for each field that differs (of `keys`, default all)."""
    names = sorted(set(saved) | set(ours)) if keys is None else sorted(keys)
    return [f"{k}: {saved.get(k, '(absent)')!r} -> {ours.get(k, '(absent)')!r}"
            for k in names if _normal(saved.get(k)) != _normal(ours.get(k))]


def _normal(value: Any) -> Any:
    # JSON turns tuples into lists; compare the two forms as equal.
    return [_normal(v) for v in value] if isinstance(value, (list, tuple)) else value


def check_resume(path: str, meta: dict, ours: RunIdentity, fields: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint written by another run, or one this run's config no
    longer fits. Checkpoints from before identities were recorded carry no `run` and are
    refused too: whose they are cannot be told."""
    saved_run = meta.get("run")
    if saved_run is None:
        raise IdentityError(f"{path}: records no run identity; cannot tell whose it is. "
                            "Start fresh, or warm-start from it with checkpoint.initFrom")
    theirs = RunIdentity.from_dict(saved_run)
    if (theirs.namespace, theirs.name, theirs.uid) != (ours.namespace, ours.name, ours.uid):
        raise IdentityError(f"{path}: written by run {theirs}, not by this run {ours}; a run resumes only "
                            "its own checkpoints (use checkpoint.initFrom to start from another run's)")
    changed = differences(meta.get("compatibility", {}), fields)
    if changed:
        raise IdentityError(f"{path}: run {ours} changed since this checkpoint, so it cannot resume "
                            f"it exactly: {'; '.join(changed)}")


def check_init_from(path: str, meta: dict, config: TrainerConfig) -> None:
    """A warm start needs only the weight fields to agree."""
    ours = weight_fields(config)
    changed = differences(meta.get("compatibility", {}), ours, keys=ours)
    if changed:
        theirs = RunIdentity.from_dict(meta["run"]) if meta.get("run") else "an unknown run"
        raise IdentityError(f"checkpoint.initFrom {path} (run {theirs}) does not fit this model: "
                            f"{'; '.join(changed)}")
