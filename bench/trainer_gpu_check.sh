#!/bin/bash
# One prepared device run (see bench/trainer_gpu_check.py); needs .whl/ carried with
# DeepSpeed's package zip and the pydantic/hjson wheels for Python 3.12.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/hjson-*.whl .whl/pydantic-*.whl .whl/pydantic_core-*.whl .whl/annotated_types-*.whl \
    .whl/typing_inspection-*.whl || exit 1
python3 -m zipfile -e .whl/deepspeed-0.19.8.zip /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 BLOOMRUN_CACHE=/tmp/bloomrun-cache
nvidia-smi -L
python3 bench/trainer_gpu_check.py "${OUT:-/tmp/out}" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
