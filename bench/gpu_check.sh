#!/usr/bin/env bash
# The kernels' one GPU session: every benchmark (ratios against baselines run in the same
# process), the kernel tests at full size with bf16, and the model's training throughput
# through the trainer. Every result lands under $OUT as it is produced, so a run cut short
# still returns what it measured. Steps run in priority order, each with its own limit;
# name steps to run only those:  bench/gpu_check.sh [attention layer_norm ...]
# Needs .whl/ carried: `bash bench/gpu_wheels.sh` fills it here, then run this through the
# device tool with carry [".whl"] and a timeout a little above BUDGET.
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

# The whole script stops within BUDGET seconds (default 420) so that one device call fits a
# 15-minute device session with its start-up and leaves room to rerun the steps that failed
# (name them, with a smaller BUDGET): each step gets its own limit or what is left of the
# budget, whichever is smaller, and steps that find no time left are skipped. Last run's
# step times on an H200: attention 72 s, layer_norm 23, cross_entropy 22, activations 53,
# model 73 (two variants; the compiled one adds its Inductor compile), tests ~65.
BUDGET=${BUDGET:-420}
run_step() {  # name, seconds, command...
    local name=$1 limit=$2 start=$SECONDS left=$((BUDGET - SECONDS))
    shift 2
    if [ "$left" -lt 20 ]; then echo "== $name skipped: budget spent" | tee -a "$LOG"; return; fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name (limit ${limit}s)" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -v -i "warn" | tail -n 25
    echo "== $name rc=${PIPESTATUS[0]} in $((SECONDS - start))s" | tee -a "$LOG"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests attention layer_norm model activations cross_entropy sweep)
for step in "${steps[@]}"; do
    case $step in
        attention|layer_norm|cross_entropy|activations)
            run_step "$step" 90 python3 -m "bench.$step" --out "$OUT/$step.json" ;;
        tests)  # one config per kernel (no tuning sweep: each config is a compilation); the
                # confcutdir skips the suite-wide conftest, whose cluster fixture imports the
                # kubernetes client that the GPU image lacks
            run_step tests 120 env BLOOMRUN_TRITON_AUTOTUNE=0 python3 -m pytest tests/kernels -q -x -n 8 \
                --confcutdir=tests/kernels -p no:cacheprovider --durations=15 -o addopts="" ;;
        model)  # eager Triton, compiled Triton (custom ops under Inductor), the torch baseline
            run_step model 200 python3 -m bench.model_throughput --variants triton,triton-compile,torch \
                --out "$OUT/model.json" ;;
        sweep)  # per-launch device times and the launch rules' knobs of the memory-bound kernels
            run_step sweep 120 python3 -m bench.memory_bound_sweep ;;
        hf)  # transformers' BloomForCausalLM anchor, not in the default list (the issue gives it)
            run_step hf 90 python3 -m bench.model_throughput --variants hf --out "$OUT/model_hf.json" ;;
        *) echo "unknown step $step" | tee -a "$LOG" ;;
    esac
done
echo "== done at $(date -u)" | tee -a "$LOG"
