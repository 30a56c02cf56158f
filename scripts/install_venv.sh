#!/usr/bin/env bash
# Creates (or tops up) the project's virtual environment from requirements/*.txt.
# torch comes first and alone: DeepSpeed builds against it without build isolation, and
# DS_BUILD_SHM_COMM=1 compiles DeepSpeed's CPU communication op now instead of at the
# first init_distributed (a ~26 s g++ JIT build per fresh cache).
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" -r requirements/build.txt  # pip, setuptools, wheel: the images' (build.lock)
"${pip[@]}" "$(grep -E '^torch==' requirements/trainer.txt)"
DS_BUILD_SHM_COMM=1 "${pip[@]}" --no-build-isolation -r requirements/trainer.txt
"${pip[@]}" -r requirements/operator.txt -r requirements/cli.txt -r requirements/test.txt
"${pip[@]}" --no-deps --no-build-isolation -e .
