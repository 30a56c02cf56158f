"""The images' hash-pinned locks (requirements/NAME.lock, written by
scripts/lock_requirements.sh, installed by the Dockerfiles with --require-hashes --no-deps):
for every Python the images run, each lock holds exactly one version of each package, each
with sha256s, pins what requirements/NAME.txt pins (the file CI installs) and what
pyproject.toml asks of that image, and nothing of the machine that wrote it.

Offline: whether a lock is complete (every dependency of every entry listed) is checked
against PyPI's metadata by the script itself when it writes the locks."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "requirements"
# The image a lock is for, and the pyproject extra that image installs bloomrun for.
IMAGES = {"trainer": ("Dockerfile", "trainer"), "operator": ("Dockerfile.operator", "operator")}
LOCKS = ["build", *IMAGES]
# The Pythons the images run: Debian bookworm's 3.11 (the operator's slim base, the CPU test
# bases of tools/images) and Ubuntu 24.04's 3.12 (the trainer's CUDA base).
PYTHONS = ["3.11", "3.12"]
# Core dependencies of bloomrun the operator image leaves out (it installs bloomrun
# --no-deps): only the CLI and the trainer import them (test below).
NOT_IN_OPERATOR = {"numpy", "rich"}
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})\b")


def target(python: str) -> dict[str, str]:
    """Marker environment of the images: CPython `python` on Linux x86_64."""
    env = default_environment()
    env.update(python_version=python, python_full_version=f"{python}.0", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", os_name="posix",
               implementation_name="cpython", platform_python_implementation="CPython")
    return env


def lock_entries(name: str) -> list[tuple[Requirement, list[str]]]:
    """(requirement, sha256s) of each entry of requirements/NAME.lock, markers kept."""
    entries: list[tuple[Requirement, list[str]]] = []
    for line in (REQUIREMENTS / f"{name}.lock").read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            assert not line.startswith("-"), f"{name}.lock has an option line: {line}"
            entries.append((Requirement(line.rstrip(" \\")), []))
        elif line.strip().startswith("--hash="):
            assert entries, f"{name}.lock: a hash before any entry"
            entries[-1][1].extend(HASH.findall(line))
    return entries


def installed(name: str, python: str) -> dict[str, str]:
    """name -> version pip installs from requirements/NAME.lock on `python` (markers applied)."""
    found: dict[str, str] = {}
    for req, _ in lock_entries(name):
        if req.marker is None or req.marker.evaluate(target(python)):
            key = canonicalize_name(req.name)
            assert key not in found, f"{name}.lock installs {key} twice on Python {python}"
            found[key] = exact(req, f"{name}.lock")
    return found


def exact(req: Requirement, where: str) -> str:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, (
        f"{where}: {req} is not pinned to one exact version")
    return specs[0].version


def pins(name: str) -> dict[str, str]:
    """name -> version of requirements/NAME.txt, each line an exact pin."""
    found = {}
    for line in (REQUIREMENTS / f"{name}.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            found[canonicalize_name(req.name)] = exact(req, f"{name}.txt")
    return found


def pyproject_needs(extra: str) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"][extra]]]


@pytest.mark.parametrize("name", LOCKS)
def test_every_entry_is_one_exact_version_with_sha256s(name):
    entries = lock_entries(name)
    assert entries, f"requirements/{name}.lock is empty: run scripts/lock_requirements.sh"
    for req, hashes in entries:
        exact(req, f"{name}.lock")
        assert hashes, f"{name}.lock: {req} has no sha256 (pip --require-hashes refuses it)"
    text = (REQUIREMENTS / f"{name}.lock").read_text()
    # Nothing of the machine that wrote it: its index or wheel folders.
    assert not re.search(r"--(extra-)?index-url|--find-links|-f |file://", text)


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("name", LOCKS)
def test_a_lock_pins_what_its_requirements_file_pins(name, python):
    got = installed(name, python)
    for package, version in pins(name).items():
        assert package in got, f"{name}.lock lacks {package} on Python {python}: run scripts/lock_requirements.sh"
        assert got[package] == version, (
            f"{name}.lock pins {package}=={got[package]}, {name}.txt {version}: run scripts/lock_requirements.sh")
    if name != "build":
        assert len(got) > len(pins(name)), f"{name}.lock holds no transitive dependency"


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("name", IMAGES)
def test_image_locks_use_the_build_tools_of_build_lock(name, python):
    """Both images install build.lock first; a tool their lock also holds (torch needs
    setuptools) must be the same version, or the second install would swap it."""
    tools, got = installed("build", python), installed(name, python)
    assert {p: v for p, v in got.items() if p in tools and tools[p] != v} == {}


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("name", IMAGES)
def test_an_image_lock_meets_what_pyproject_asks_of_that_image(name, python):
    _, extra = IMAGES[name]
    got = installed(name, python)
    for req in pyproject_needs(extra):
        package = canonicalize_name(req.name)
        if name == "operator" and package in NOT_IN_OPERATOR:
            continue
        assert package in got, f"{name}.lock lacks {package}, which pyproject.toml asks for ({req})"
        assert req.specifier.contains(got[package], prereleases=True), (
            f"{name}.lock pins {package}=={got[package]}, pyproject.toml asks {req}")


def test_the_operator_never_imports_what_its_image_leaves_out():
    code = ("import importlib, pkgutil, sys, bloomrun.operator as op\n"
            "for m in pkgutil.iter_modules(op.__path__): importlib.import_module('bloomrun.operator.' + m.name)\n"
            "print(' '.join(sorted(m for m in sys.modules if '.' not in m)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    imported = {canonicalize_name(m) for m in out.stdout.split()}
    assert imported & NOT_IN_OPERATOR == set(), "the operator image lacks these: add them to operator.txt"
    assert "kopf" in imported  # the import above did load the operator


def test_the_lock_script_and_the_images_agree_on_the_pythons():
    script = (REPO / "scripts" / "lock_requirements.sh").read_text()
    assert re.search(r"^PYTHONS=\((.*)\)$", script, re.M).group(1).split() == PYTHONS
    image_pythons = set(re.findall(r"ARG PYTHON=python(\d+\.\d+)", (REPO / "Dockerfile").read_text()
                                   + (REPO / "Dockerfile.operator").read_text()))
    image_pythons |= set(re.findall(r"PYTHON=python(\d+\.\d+)", (REPO / "tools" / "images" / "build.sh").read_text()))
    assert image_pythons and image_pythons <= set(PYTHONS), f"images run {image_pythons}, locks are checked for {PYTHONS}"
