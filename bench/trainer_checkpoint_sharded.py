"""Checkpoint cost of a tensor-parallel run: consolidated (every rank gathers the full state,
rank 0 writes it) vs sharded (every rank writes its own pieces), on the trainer's engine
(MeshEngine: DTensor TP + FSDP2) and the trainer's save/choose/load. Run under torchrun:

    torchrun --standalone --nproc-per-node=4 bench/trainer_checkpoint_sharded.py OUT_DIR [TENSOR LAYERS HIDDEN]

Prints, per layout: save and load seconds (load includes choosing and verifying checksums),
bytes on disk, and each rank's peak host memory above its level before the save (RSS sampled
every 2 ms by a thread: a lower bound on the true peak); then the consolidated path's gather
alone, as the trainer does it (each rank's pieces, all-reduced) and as DTensor does it.
"""

import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bloomrun.trainer import checkpoint as ckpt
from bloomrun.trainer import parallel, shard_layout
from bloomrun.trainer.config import TrainerConfig
from bloomrun.trainer.mesh_engine import MeshEngine
from bloomrun.trainer.model import build_model


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Largest RSS above the level at entry, sampled by a thread while the block runs."""

    def __enter__(self):
        self.base = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())

    @property
    def above(self) -> int:
        return self.peak - self.base


def main(out: str, tensor: int = 2, layers: int = 8, hidden: int = 512) -> None:
    dist.init_process_group("gloo")
    world = parallel.World.from_env()
    cfg = TrainerConfig.model_validate({
        "model": {"preset": None, "numLayers": layers, "hiddenSize": hidden, "numHeads": 8, "seqLength": 32,
                  "vocabSize": 50257, "kernels": "torch", "activation": "swiglu"},
        "data": {"sources": [{"path": "unused"}]},
        "training": {"globalBatchSize": 4, "microBatchSize": 1, "trainSteps": 1},
        "parallel": {"tensor": tensor},
    })
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu")
    params = model.num_parameters()
    engine = MeshEngine.create(model, cfg, world, torch.device("cpu"))
    parallel.init_optimizer_state(engine, engine.optimizer)
    rows = []
    for layout in (ckpt.CONSOLIDATED, ckpt.SHARDED):
        root = Path(out) / layout
        dist.barrier()
        with PeakRss() as peak:
            start = time.perf_counter()
            ckpt.save(root, ckpt.TrainState(step=1), engine, engine.optimizer, world, keep_last=1, layout=layout)
            save_s = time.perf_counter() - start
        dist.barrier()
        start = time.perf_counter()
        path, meta = ckpt.choose(root, world, torch.device("cpu"))
        ckpt.load(path, meta, engine, engine.optimizer, world)
        dist.barrier()
        load_s = time.perf_counter() - start
        peaks = [None] * world.world_size
        dist.all_gather_object(peaks, peak.above)
        size = sum(f.stat().st_size for f in path.iterdir())
        rows.append((layout, save_s, load_s, size, peaks))
    gathers = {"pieces + all-reduce (tensor_parallel.full_tensor)": shard_layout.assemble_full,
               "DTensor.full_tensor()": lambda t: t.full_tensor()}
    gather_s = {}
    for label, gather in gathers.items():
        dist.barrier()
        start = time.perf_counter()
        with torch.no_grad():
            for param in engine.module.parameters():
                for value in (param, *(engine.optimizer.state[param][k] for k in parallel.MOMENTS)):
                    gather(value)
        dist.barrier()
        gather_s[label] = time.perf_counter() - start
    if world.rank == 0:
        print(f"{params / 1e6:.1f}M parameters (12 bytes each: {12 * params / 1e6:.0f} MB of state), "
              f"{world.world_size} ranks, T{tensor} x DP{world.world_size // tensor}")
        for layout, save_s, load_s, size, peaks in rows:
            print(f"  {layout:12s} save {save_s:.2f} s, load {load_s:.2f} s, {size / 1e6:.0f} MB, "
                  f"peak host memory above the pre-save level per rank (MB): "
                  f"{', '.join(f'{p / 1e6:.0f}' for p in peaks)}")
        for label, seconds in gather_s.items():
            print(f"  gathering every full tensor once, {label}: {seconds:.2f} s")
        shutil.rmtree(out, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
