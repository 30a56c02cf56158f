"""The engine of tensor-parallel runs: DTensor tensor parallelism inside a node, torch FSDP2
over the data-parallel replicas, and the small part of DeepSpeed's engine interface the
trainer drives (forward, backward, step with accumulation, the batch size).

Why not DeepSpeed here: its engine does not take DTensor parameters. Measured with DeepSpeed
0.19.8 and torch 2.15 (2 CPU ranks, gloo, a ColwiseParallel/RowwiseParallel pair):
`deepspeed.initialize` fails in `_configure_distributed_model` at `module.to(device)` with
"_apply(): Couldn't swap Linear.weight ... Cannot swap t1 because it has weakref associated
with it" for ZeRO 0 and 1 alike, with the optimizer passed built or as a callable; and ZeRO
1-3 flatten parameters into one buffer, which a DTensor's local shard with its placement
cannot be. FSDP2 (`fully_shard` over the mesh's dp dimension) composes with TP DTensors by
design (torchtitan's 2-D parallelism): 2 x 2 ranks with gloo trained and clipped there.

ZeRO stages over the data-parallel replicas, with FSDP2: AdamW's moments are always sharded
across the replicas, and the stage says how often weights and gradients move, as in ZeRO:
- 0 and 1: the weights are gathered at a step's first forward and kept until its last
  backward, and the gradients accumulate whole and are reduce-scattered once a step (one
  all-gather and one reduce-scatter a step, ZeRO-1's traffic; FSDP2's default does both for
  every micro-batch, which bench/comm_volume.py's counts showed: 142 GB per GPU per step at
  7b1 T2 x DP32 against 60 once a step);
- 2: the same weights, but every micro-batch's gradients reduce-scattered (ZeRO-2's
  partitioned gradients: less memory, more traffic);
- 3: each block's weights are also freed after its forward and after its backward and
  gathered again (reshard_after_forward), as ZeRO-3 does.
With one replica (world = tensor) there is nothing to shard and FSDP2 is not applied.
"""

from __future__ import annotations

import torch

from bloomrun.trainer import parallel, tensor_parallel
from bloomrun.trainer.config import TrainerConfig
from bloomrun.trainer.model import Bloom


class MeshEngine:
    """What the trainer calls on DeepSpeed's engine, for a DTensor model on a (dp, tp) mesh."""

    def __init__(self, model: Bloom, optimizer: torch.optim.Optimizer, micro_batch: int, mesh, device,
                 zero_stage: int = 1):
        self.module, self.optimizer, self.mesh, self.device = model, optimizer, mesh, device
        self.micro_batch, self.zero_stage = micro_batch, zero_stage
        self._accumulation = 1
        self._micro_step = 0  # micro-batches done in the current optimiser step

    @classmethod
    def create(cls, model: Bloom, cfg: TrainerConfig, world: parallel.World, device) -> "MeshEngine":
        """Shard `model` (the same weights on every rank) over the mesh, then its optimizer."""
        mesh = tensor_parallel.build_mesh(device.type, world.world_size, cfg.parallel.tensor)
        tensor_parallel.parallelize(model, mesh["tp"])
        if mesh["dp"].size() > 1:
            from torch.distributed.fsdp import fully_shard

            reshard = cfg.training.zero_stage == 3
            for block in model.h:  # one all-gather per block, as torchtitan wraps them
                fully_shard(block, mesh=mesh["dp"], reshard_after_forward=reshard)
            fully_shard(model, mesh=mesh["dp"], reshard_after_forward=False)
        optimizer = parallel.build_optimizer(model, cfg, world)
        return cls(model, optimizer, cfg.training.micro_batch_size, mesh, device, cfg.training.zero_stage)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def backward(self, loss: torch.Tensor) -> None:
        # The mean over the step's micro-batches, as DeepSpeed scales; FSDP2 averages the
        # replicas' gradients in its reduce-scatter.
        self._sync_on(self.is_gradient_accumulation_boundary())
        (loss / self._accumulation).backward()

    def _sync_on(self, last: bool) -> None:
        """Before a micro-batch's backward: whether FSDP2 reduce-scatters its gradients and
        frees the gathered weights after it (the module docstring's stages)."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.module, FSDPModule):
            self.module.set_requires_gradient_sync(last or self.zero_stage >= 2)
            self.module.set_reshard_after_backward(last or self.zero_stage >= 3)

    def is_gradient_accumulation_boundary(self) -> bool:
        return self._micro_step == self._accumulation - 1

    def step(self) -> None:
        """After each micro-batch's backward; the optimizer steps after the last one."""
        if not self.is_gradient_accumulation_boundary():
            self._micro_step += 1
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._micro_step = 0

    def gradient_accumulation_steps(self) -> int:
        return self._accumulation

    def set_train_batch_size(self, global_batch: int) -> None:
        self._accumulation = parallel.gradient_accumulation(global_batch, self.micro_batch, self.mesh["dp"].size())

    def get_global_grad_norm(self) -> None:
        return None  # the trainer measures it (parallel.optimizer_clips)

    def zero_optimization_stage(self) -> int:
        """0 for parallel.py's state helpers: AdamW's state is per (DTensor) parameter."""
        return 0
