#!/usr/bin/env bash
# Fills .whl/ (git-ignored; the device tool carries it with `carry: [".whl"]`) with what the
# GPU machine lacks for bench/gpu_check.sh: its image has torch, Triton and transformers but
# no DeepSpeed, Liger-Kernel or pydantic, and it reaches no package index. Wheels are for
# that machine's Python 3.12. DeepSpeed ships only an sdist; its wheel (pure Python: ops are
# JIT-built, and the benchmarks use none) goes in as a .zip that the check script unpacks,
# because pip would try to resolve its dependencies against the missing index.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pip=(.venv/bin/python -m pip)
"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --implementation cp -d .whl pydantic==2.14.3 pydantic_core==2.50.4 annotated_types==0.8.0 \
    typing_inspection==0.4.5 hjson==3.1.0 liger-kernel==0.8.5
if [ ! -f .whl/deepspeed-0.19.8.zip ]; then
    tmp=$(mktemp -d)
    DS_BUILD_OPS=0 "${pip[@]}" wheel -q --no-deps --no-build-isolation -w "$tmp" deepspeed==0.19.8
    mv "$tmp"/deepspeed-0.19.8-*.whl .whl/deepspeed-0.19.8.zip
    rm -rf "$tmp"
fi
ls -l .whl
