#!/usr/bin/env bash
# The kernels' one GPU session: every benchmark (ratios against baselines run in the same
# process), the kernel tests at full size with bf16, and the model's training throughput
# through the trainer. Every result lands under $OUT as it is produced, so a run cut short
# still returns what it measured. Steps run in priority order, each with its own limit;
# name steps to run only those:  bench/gpu_check.sh [attention layer_norm ...]
# Needs .whl/ carried (pydantic, hjson, Liger-Kernel wheels and DeepSpeed's zip; see BENCHMARKS.md).
set -uo pipefail
OUT=${OUT:-/tmp/bloomrun-gpu}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >>"$LOG" 2>&1 && python3 -m zipfile -e .whl/deepspeed-0.19.8.zip /tmp/site >>"$LOG" 2>&1 \
    || echo "wheel install failed (Liger and DeepSpeed steps will report it)" | tee -a "$LOG"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-cache BLOOMRUN_CACHE=/tmp/bloomrun-cache
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee -a "$LOG"

run_step() {  # name, seconds, command...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -v -i "warn" | tail -n 25
    echo "== $name rc=${PIPESTATUS[0]} in $((SECONDS - start))s" | tee -a "$LOG"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(attention layer_norm cross_entropy tests activations model)
for step in "${steps[@]}"; do
    case $step in
        attention|layer_norm|cross_entropy|activations)
            run_step "$step" 110 python3 -m "bench.$step" --out "$OUT/$step.json" ;;
        tests)  # one config per kernel (no tuning sweep: each config is a compilation); the
                # confcutdir skips the suite-wide conftest, whose cluster fixture imports the
                # kubernetes client that the GPU image lacks
            run_step tests 100 env BLOOMRUN_TRITON_AUTOTUNE=0 python3 -m pytest tests/kernels -q -x -n 8 \
                --confcutdir=tests/kernels -p no:cacheprovider --durations=15 -o addopts="" ;;
        model)
            run_step model 150 python3 -m bench.model_throughput --variants triton,torch --out "$OUT/model.json" ;;
        *) echo "unknown step $step" | tee -a "$LOG" ;;
    esac
done
echo "== done at $(date -u)" | tee -a "$LOG"
