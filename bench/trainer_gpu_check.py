"""The trainer on one GPU: a full run with a checkpoint and a resume (bf16 autocast, fused
AdamW, NCCL), then step timings at the paper's 1.3B ablation shape for engine variants.

    python3 bench/trainer_gpu_check.py OUT_DIR            # everything
    python3 bench/trainer_gpu_check.py OUT_DIR time ZERO KERNELS COMPILE   # one variant
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def corpus(folder: Path) -> Path:
    from bloomrun.trainer.data import IndexedDatasetWriter

    prefix = folder / "random"
    if not prefix.with_suffix(".idx").exists():
        rng = np.random.default_rng(0)
        writer = IndexedDatasetWriter(prefix, np.uint16)
        for _ in range(400):
            writer.add_document(rng.integers(0, 50257, 4000))
        writer.finalize()
    return prefix


def config(prefix: Path, **over) -> dict:
    cfg = {
        "model": {"preset": "1b3", "kernels": "torch"},
        "data": {"sources": [{"path": str(prefix)}]},
        "training": {"globalBatchSize": 4, "microBatchSize": 4, "trainSteps": 10_000, "zeroStage": 0},
        "metrics": {"port": 0},
    }
    for section, values in over.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def functional(out: Path, prefix: Path) -> None:
    folder = out / "functional"
    small = {"preset": None, "numLayers": 4, "hiddenSize": 256, "numHeads": 4, "seqLength": 256,
             "vocabSize": 50257, "kernels": "torch"}
    for steps in (20, 30):
        cfg = config(prefix, model=small, training={"trainSteps": steps, "globalBatchSize": 8, "microBatchSize": 4,
                                                   "zeroStage": 1},
                     checkpoint={"dir": str(folder / "checkpoints"), "everySteps": 10},
                     optim={"lr": 1e-3, "warmupTokens": 20000})
        (folder / "cfg.yaml").parent.mkdir(parents=True, exist_ok=True)
        (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        start = time.time()
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                               "-m", "bloomrun.trainer.train", "--config", str(folder / "cfg.yaml")],
                              capture_output=True, text=True, timeout=240)
        lines = [l for l in (done.stdout + done.stderr).splitlines() if "bloomrun" in l]
        print(f"functional run to {steps}: exit {done.returncode} in {time.time() - start:.0f} s")
        print("\n".join(lines[:3] + lines[-6:]))
        if done.returncode:
            print((done.stdout + done.stderr)[-3000:])


def time_variant(prefix: Path, zero: int, kernels: str, compile_: bool) -> dict:
    from bloomrun.trainer.config import TrainerConfig
    from bloomrun.trainer.trainer import Trainer
    import torch

    cfg = TrainerConfig.model_validate(config(prefix, model={"kernels": kernels},
                                              training={"zeroStage": zero, "compile": compile_}))
    trainer = Trainer(cfg, serve_metrics=False)
    start = time.time()
    trainer.train_steps(3 if not compile_ else 4)
    warm = time.time() - start
    seconds = trainer.train_steps(8)
    median = statistics.median(seconds)
    tokens = 4 * 2048
    return {"zero": zero, "kernels": kernels, "compile": compile_, "warmup_s": round(warm, 1),
            "step_ms": round(median * 1e3, 1), "tokens_per_s": round(tokens / median),
            "model_tflops": round(tokens / median * trainer.flops_per_token / 1e12, 1),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1), "device": torch.cuda.get_device_name()}


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    prefix = corpus(Path("/tmp/gpu-check"))
    if len(sys.argv) > 2 and sys.argv[2] == "time":
        print(json.dumps(time_variant(prefix, int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1")), flush=True)
        return
    functional(out, prefix)
    for zero, kernels, compile_ in ((0, "torch", 0), (1, "torch", 0), (0, "torch", 1), (0, "auto", 0)):
        done = subprocess.run([sys.executable, __file__, str(out), "time", str(zero), kernels, str(compile_)],
                              capture_output=True, text=True, timeout=200)
        result = [l for l in done.stdout.splitlines() if l.startswith("{")]
        print(result[0] if result else f"variant zero={zero} {kernels} compile={compile_}: exit {done.returncode}\n"
              + (done.stdout + done.stderr)[-1500:], flush=True)


if __name__ == "__main__":
    os.chdir(REPO)
    main()
