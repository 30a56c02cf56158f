"""`bloomctl`: the command line. Each subcommand lives in its own module of this package,
which exposes `add_parser(subparsers)` and sets `func` on its parser; heavy imports (torch,
kopf) happen inside the subcommand, so `bloomctl validate` stays fast."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

# module name -> one-line help; each module registers its own arguments.
SUBCOMMANDS = {
    "run": "train a BloomRun manifest locally with torchrun (the embedded default)",
    "validate": "check a BloomRun manifest offline with the API server's rules",
    "data": "prepare pretokenized data (Megatron-DeepSpeed .bin/.idx)",
    "export": "export a checkpoint as a Hugging Face BloomForCausalLM directory",
    "checkpoint": "work with the trainer's checkpoints (consolidate a sharded one)",
    "eval": "zero-shot evaluation of a checkpoint with lm-evaluation-harness",
    "study": "run an ablation study (BloomStudy) locally, show its table, write its report",
    "plan": "propose the final model's size and shape for a GPU-hour budget",
}

EXIT_USAGE = 2  # bad manifest, bad config, bad arguments: the user's input is wrong


class UserError(Exception):
    """An error in the user's input; printed as one line, exit code 2, no traceback."""


DESCRIPTION = (
    "Train BLOOM-style language models the way BigScience designed BLOOM: a BloomRun manifest "
    "trains locally with torchrun (bloomctl run) or on Kubernetes through the bloomrun operator "
    "(kubectl apply)."
)


def plain(text: str | None) -> str | None:
    """Help text without the markdown the module docstrings use (`code` reads as noise in a
    terminal)."""
    return text.replace("`", "") if text else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bloomctl", description=DESCRIPTION,
        epilog="Run 'bloomctl COMMAND --help' for the options of one command.")
    parser.add_argument("--version", action="version", version=f"bloomctl {version()}")
    # Not required=True: argparse would then say only "required: command"; main() names them.
    subparsers = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"bloomrun.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"bloomrun.cli.{name}":
                raise
            continue
        module.add_parser(subparsers)
    for sub in walk(parser):
        sub.description = plain(sub.description)
    return parser


def walk(parser: argparse.ArgumentParser):
    """Every parser below `parser`, nested ones (`data prepare`) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from walk(sub)


def version() -> str:
    try:
        return importlib.metadata.version("bloomrun")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error(f"a command is needed, one of: {', '.join(SUBCOMMANDS)}")
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"bloomctl {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run through the importable module, so the UserError that subcommands raise (imported
    # from bloomrun.cli.main) is the class caught above, not a twin defined in __main__.
    from bloomrun.cli.main import main as _main

    sys.exit(_main())
