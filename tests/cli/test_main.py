"""What a new user sees of `bloomctl` itself: its help, version and usage errors."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bloomrun.cli.main import SUBCOMMANDS, build_parser, main, walk

BLOOMCTL = str(Path(sys.executable).parent / "bloomctl")


def bloomctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BLOOMCTL, *args], capture_output=True, text=True)


def test_help_describes_the_tool_in_whole_sentences_and_lists_every_command():
    out = bloomctl("--help")
    assert out.returncode == 0
    description = out.stdout.split("\n\n")[1]
    assert description.rstrip().endswith(".") and "BloomRun" in description
    for name in SUBCOMMANDS:
        # A name longer than argparse's help column (checkpoint) has its help on the next line.
        assert re.search(rf"\n    {name}\s", out.stdout), name


def test_version_names_the_installed_package():
    import importlib.metadata

    out = bloomctl("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"bloomctl {importlib.metadata.version('bloomrun')}"


def test_a_missing_command_names_the_commands_that_exist(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "one of: run, validate, data, export" in err and "required: command" not in err


@pytest.mark.parametrize("sub", [p.prog for p in walk(build_parser())])
def test_every_command_has_a_description_without_markdown(sub):
    parser = next(p for p in walk(build_parser()) if p.prog == sub)
    assert parser.description, f"{sub} --help has no description"
    assert "`" not in parser.format_help(), f"{sub} --help shows markdown backticks"
