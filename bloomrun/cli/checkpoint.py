"""`bloomctl checkpoint consolidate STEP_DIR --output DIR`: a sharded checkpoint (every rank's
own pieces, `checkpoint.format: sharded`) as a consolidated one (model.safetensors +
optimizer.safetensors), published as DIR/step-N with the same protocol as a save (checksums,
metadata last, atomic rename). It reads one full tensor at a time, so memory stays bounded by
the largest tensor, not the model (docs/trainer.md, "Sharded checkpoints").

Resume and `bloomctl export` read either layout as they are: consolidate for tools that
expect the two files, or to keep one self-contained copy of a step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bloomrun.cli.main import UserError


def add_parser(subparsers) -> None:
    checkpoint = subparsers.add_parser(
        "checkpoint", help="work with the trainer's checkpoints (consolidate a sharded one)",
        description="The trainer's checkpoints, offline (docs/trainer.md).")
    actions = checkpoint.add_subparsers(dest="checkpoint_command", required=True, metavar="ACTION",
                                        title="actions")
    consolidate = actions.add_parser(
        "consolidate", help="write a sharded checkpoint as a consolidated one, one tensor at a time",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    consolidate.add_argument("step_dir", type=Path, metavar="STEP_DIR", help="a sharded checkpoint folder (step-N)")
    consolidate.add_argument("--output", required=True, type=Path,
                             help="folder to publish step-N in (created if missing; not the source's own)")
    consolidate.set_defaults(func=run_consolidate)


def run_consolidate(args: argparse.Namespace) -> int:
    from bloomrun.trainer import checkpoint as ckpt
    from bloomrun.trainer.checkpoint_shards import ShardError
    from bloomrun.trainer.checkpoint_sharded import consolidate

    source, output = args.step_dir, args.output
    meta = check_source(source)
    target = output / ckpt.step_dir_name(meta["step"])
    if target.exists():
        # publish_folder replaces a step folder of the same name (a re-save): here that would be
        # another checkpoint, or with --output the source's own folder, the source itself.
        raise UserError(f"{target} exists: remove it or choose another --output")
    try:
        path = consolidate(source, output)
    except (ckpt.CheckpointError, ShardError) as err:  # checksums, a malformed index
        raise UserError(str(err)) from None
    print(json.dumps({"consolidated": str(path), "step": meta["step"], "from": str(source)}))
    return 0


def check_source(source: Path) -> dict:
    """The metadata of STEP_DIR if it is a complete sharded checkpoint by its structure (the
    checksums are consolidate's to verify: reading them all here would read it twice)."""
    from bloomrun.trainer import checkpoint as ckpt

    if not source.is_dir():
        raise UserError(f"{source}: no such checkpoint folder")
    try:
        meta = ckpt.check_structure(source)
    except ckpt.CheckpointError as err:
        raise UserError(f"not a complete checkpoint: {err}") from None
    if not isinstance(meta.get("step"), int):
        raise UserError(f"not a complete checkpoint: {source}/{ckpt.METADATA} has no integer step")
    if ckpt.layout_of(meta) != ckpt.SHARDED:
        raise UserError(f"{source}: a consolidated checkpoint already (its {ckpt.METADATA} has no `layout: "
                        "sharded`); resume and bloomctl export read it as it is")
    return meta
