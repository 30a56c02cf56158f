#!/usr/bin/env bash
# The one way to write the images' hash-pinned locks: requirements/NAME.lock from NAME.txt,
# every transitive dependency pinned with the sha256 of each of its files on PyPI, for
# `pip install --require-hashes --no-deps -r requirements/NAME.lock` in the Dockerfiles (a
# changed or substituted file on the index is then refused, and nothing unlisted is fetched).
#
#   scripts/lock_requirements.sh                    # build, operator and trainer
#   scripts/lock_requirements.sh trainer            # some of them
#
# - build.lock: pip, setuptools and wheel, installed first by both images; operator.lock
#   (Dockerfile.operator) and trainer.lock (Dockerfile) are resolved with build.txt as
#   constraints, so a build tool they also need (torch needs setuptools) has one version.
# - uv's `pip compile` (pinned below, from a throwaway venv, not the project's): pip-tools
#   did not resolve the trainer's requirements within 25 minutes on 2 cores, uv takes seconds.
# - Universal resolution from Python 3.11 up: the images run Debian bookworm's 3.11 (the
#   operator's slim base, the CPU test bases of tools/images) and Ubuntu 24.04's 3.12 (the
#   trainer's CUDA base). Where they differ, the lock holds both pins under markers
#   (`networkx==3.6.1 ; python_full_version < '3.12'`) and pip installs the matching one.
# - One trainer flavour: torch from PyPI, the CUDA 13 build with its nvidia-* wheels, which
#   both the CUDA image and the CPU test image install (nothing reads a CPU-only index).
# - Each lock is then checked to install on its own for Linux x86_64 (glibc 2.36, bookworm's)
#   on 3.11 and 3.12: `uv pip install --dry-run --require-hashes` without --no-deps fails
#   when any dependency is missing from the lock or has no hash.
# - uv reads no pip configuration, so a machine's wheel folders (PIP_FIND_LINKS) or index
#   never reach a lock; it takes the system's CA certificates (--system-certs), for machines
#   whose TLS is intercepted.
# tests/chart/test_locks.py fails when a lock no longer pins what its requirements file pins.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PYTHONS=(3.11 3.12)
PLATFORM=x86_64-manylinux_2_36
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install --quiet "uv==$UV_VERSION"
uv=("$tools/venv/bin/uv" --system-certs --quiet)

lock() {
  local name=$1 constraints=()
  [[ $name == build ]] || constraints=(--constraints requirements/build.txt)
  "${uv[@]}" pip compile --universal --python-version "${PYTHONS[0]}" --generate-hashes \
    --custom-compile-command "scripts/lock_requirements.sh" "${constraints[@]}" \
    --output-file "requirements/$name.lock" "requirements/$name.txt"
  for python in "${PYTHONS[@]}"; do
    "${uv[@]}" pip install --dry-run --require-hashes --python "$tools/venv/bin/python" \
      --python-version "$python" --python-platform "$PLATFORM" --target "$tools/target" \
      -r "requirements/$name.lock"
  done
  echo "wrote requirements/$name.lock (installs on its own for Python ${PYTHONS[*]}, $PLATFORM)"
}

for name in ${@:-build operator trainer}; do
  lock "$name"
done
