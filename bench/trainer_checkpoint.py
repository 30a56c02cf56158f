"""Checkpoint cost: bloomrun's consolidated safetensors format vs DeepSpeed's native
per-rank files, same engine, same model. Run under torchrun, e.g.

    torchrun --standalone --nproc-per-node=2 bench/trainer_checkpoint.py CORPUS_PREFIX OUT_DIR

Prints one line per (ZeRO stage, format): save and load seconds and bytes on disk.
"""

import os
import shutil
import sys
import time
from pathlib import Path

import torch.distributed as dist

from bloomrun.trainer.config import TrainerConfig
from bloomrun.trainer.trainer import Trainer


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(corpus: str, out: str, layers: int = 8, hidden: int = 512) -> None:
    for zero in (1, 3):
        root = Path(out) / f"zero{zero}"
        cfg = TrainerConfig.model_validate({
            "model": {"preset": "tiny", "numLayers": layers, "hiddenSize": hidden, "numHeads": 8, "seqLength": 32},
            "data": {"sources": [{"path": corpus}]},
            "training": {"globalBatchSize": 4, "microBatchSize": 2, "trainSteps": 1, "zeroStage": zero},
            "checkpoint": {"dir": str(root / "ours")},
            "metrics": {"port": 0},
        })
        trainer = Trainer(cfg, serve_metrics=False)
        trainer.train_step()
        rank = dist.get_rank()
        timings = {}
        start = time.perf_counter(); trainer.save(); timings["ours save"] = time.perf_counter() - start
        start = time.perf_counter(); trainer.resume(); timings["ours load"] = time.perf_counter() - start
        native = root / "deepspeed"
        start = time.perf_counter(); trainer.engine.save_checkpoint(str(native)); dist.barrier()
        timings["deepspeed save"] = time.perf_counter() - start
        start = time.perf_counter(); trainer.engine.load_checkpoint(str(native)); dist.barrier()
        timings["deepspeed load"] = time.perf_counter() - start
        if rank == 0:
            print(f"ZeRO {zero}, {trainer.num_parameters / 1e6:.1f}M parameters, {dist.get_world_size()} ranks:")
            print(f"  ours:      save {timings['ours save']:.2f} s, load {timings['ours load']:.2f} s, "
                  f"{folder_bytes(root / 'ours') / 1e6:.0f} MB (one world-size-free copy)")
            print(f"  deepspeed: save {timings['deepspeed save']:.2f} s, load {timings['deepspeed load']:.2f} s, "
                  f"{folder_bytes(native) / 1e6:.0f} MB (per-rank pickles)")
            shutil.rmtree(root, ignore_errors=True)
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
