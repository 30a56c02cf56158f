"""`bloomctl`: the command line. Each subcommand lives in its own module of this package,
which exposes `add_parser(subparsers)` and sets `func` on its parser; heavy imports (torch,
kopf) happen inside the subcommand, so `bloomctl validate` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# module name -> one-line help; each module registers its own arguments.
SUBCOMMANDS = {
    "run": "train a BloomRun manifest locally with torchrun (the embedded default)",
    "validate": "check a BloomRun manifest offline with the API server's rules",
    "data": "prepare pretokenized data (Megatron-DeepSpeed .bin/.idx)",
    "export": "export a checkpoint as a Hugging Face BloomForCausalLM directory",
}

EXIT_USAGE = 2  # bad manifest, bad config, bad arguments: the user's input is wrong


class UserError(Exception):
    """An error in the user's input; printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bloomctl", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"bloomrun.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"bloomrun.cli.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
