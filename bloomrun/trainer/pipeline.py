"""Pipeline parallelism, applied from outside the single-device model (the torchtitan way):
`build_stage` cuts a `Bloom` into one stage's module by layer ranges, keeping the model's
parameter names, and `PipelineEngine` runs that stage under torch.distributed.pipelining.

Stages follow BLOOM's rule (config.pipeline_stage_slots): the embedding and the tied head
count one layer slot each, so with L layers and P stages each stage has (L + 2) / P slots;
the first holds the embedding (word, learned positions, its LayerNorm) and its blocks, the
last its blocks, ln_f and the head. The head is tied to the word embedding: as Megatron
does, the last stage holds a copy of the embedding's weight (under the same name), and the
first and last stage sum their two gradients before every step, so that both copies take the
same update (the single-device model's gradient is that sum) and stay equal.

Ranks: tensor ranks innermost, then the pipeline stage, then the replica:
`rank = (data_rank x P + stage) x T + tensor_rank`, a (dp, pp, tp) DeviceMesh
(parallel.data_parallel: the T x P ranks of a replica read the same samples; a tensor group is
T consecutive ranks, one node's local ranks as the operator places them).

Tensor parallelism inside a stage (T > 1) is torchtitan's PP + TP: the stage module is
sharded by tensor_parallel.parallelize on the tp sub-mesh (its parameters DTensors), and the
activations that cross stages are plain tensors, the same on every rank of a tensor group, so
each tensor rank runs its own pipeline with the matching tensor ranks of the other stages.
The head's copy on the last stage is vocabulary-sharded like the embedding, so the tied
gradients are summed shard by shard between matching tensor ranks of the first and last stage.

Data parallel over whole pipelines, sharded with torch FSDP2 (ZeRO over the replicas, the
torchtitan way): with more than one replica, each stage module is `fully_shard`ed over the
mesh's dp dimension, block by block and then as a whole (2-D with the tp DTensors when
T > 1, as mesh_engine.py). Weights, gradients and AdamW's moments are then kept sharded over
the stage's replicas. torch.distributed.pipelining's PipelineStage turns FSDP's gradient sync
off for all but the step's last backward, so within a step each rank gathers its blocks'
weights once and accumulates whole gradients, then reduce-scatters (averages) them over dp
once; the schedule divides them by the micro-batches. At the step's peak a rank so holds
whole fp32 weights and gradients and 1/dp of the moments (and of the weights' own storage):
ZeRO-1's partitioning (the stage the config allows with a pipeline; parallel.zero_stage
reports 1; plan/memory.fsdp_states_bytes counts its bytes), whatever the manifest's
0 or 1, as mesh_engine shards at every stage. No reshard after forward: zeroStage 3 is
refused with a pipeline (config.check_parallel), and resharding would gather each block's
weights again for every micro-batch's backward. With one replica nothing is sharded and
FSDP2 is not applied. The optimizer steps on the dp shards (AdamW per DTensor parameter);
GuardedAdamW's verdict and clip coefficient come from the one global norm, so every rank
skips or clips together.

Schedule: 1F1B when the step has at least P micro-batches (torch refuses fewer), GPipe
otherwise (then all forwards, then all backwards). Both compute the same gradients; 1F1B
holds at most P micro-batches' activations instead of all of them.
Measured (2 CPU ranks, gloo, one thread each; hidden 256, 4 layers, sequence 128, global
batch 16, median of 6 steps, 2026-12): 8 micro-batches of 2, P=2 1F1B 0.352 s/step, GPipe
0.380, P=1 on one rank 0.566; 1 micro-batch of 16 (nothing to overlap), P=2 0.544 vs P=1
0.503: the bubble and the hand-offs cost ~8%.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from bloomrun.trainer import parallel, tensor_parallel
from bloomrun.trainer.config import TrainerConfig, pipeline_stage_slots
from bloomrun.trainer.model import Bloom

HEAD = "word_embeddings.weight"  # the embedding, and on the last stage the tied head's copy


def stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """The blocks of `stage`: slot 0 is the embedding, slot i + 1 block i, the last slot the head."""
    slots = pipeline_stage_slots(num_layers, num_stages)
    return range(max(stage * slots - 1, 0), min((stage + 1) * slots - 1, num_layers))


class BloomStage(nn.Module):
    """One pipeline stage of a Bloom: forward maps token ids (first stage) or hidden states to
    hidden states (after ln_f on the last stage); `loss` is the head and cross-entropy. The
    modules are the full model's own (the copy of the head's weight aside), under the same
    attribute names, so `named_parameters()` gives the consolidated checkpoint's names."""

    def __init__(self, model: Bloom, stage: int, num_stages: int):
        super().__init__()
        self.args, self.kernels = model.args, model.kernels
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        if self.is_first:
            self.word_embeddings = model.word_embeddings
            self.position_embeddings = model.position_embeddings
            self.word_embeddings_layernorm = model.word_embeddings_layernorm
        # A dict keyed by the block's index in the model: `h.5.mlp...` keeps its name.
        self.h = nn.ModuleDict({str(i): model.h[i] for i in stage_layers(model.args.num_layers, num_stages, stage)})
        if self.is_last:
            self.ln_f = model.ln_f
            if not self.is_first:  # the tied head: a copy, kept equal by summing the gradients
                self.word_embeddings = copy.deepcopy(model.word_embeddings)

    def use_kernels(self, kernels) -> "BloomStage":
        """Bloom.use_kernels for the stage's modules (tensor_parallel.parallelize sets its own)."""
        self.kernels = kernels
        Bloom.use_kernels(self, kernels)
        return self

    def holds_head_copy(self) -> bool:
        """Whether this stage's `word_embeddings.weight` is the head's copy of the first stage's."""
        return self.is_last and not self.is_first

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bloom.hidden_states' embedding part, (B, T) -> (B, T, C); the P=1 vs P=2 tests
        compare the two paths' losses."""
        T = input_ids.shape[1]
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            if T > self.position_embeddings.num_embeddings:
                raise ValueError(f"sequence of {T} tokens is longer than the "
                                 f"{self.position_embeddings.num_embeddings} learned positions (model.seqLength)")
            x = x + self.position_embeddings(torch.arange(T, device=input_ids.device))
        if self.word_embeddings_layernorm is not None:
            x = self.word_embeddings_layernorm(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            x = self.embed(x)  # (B, T, C)
        # ALiBi slopes and rotary angles depend only on the arguments and T: each stage makes its own.
        positions = Bloom.position_inputs(self, x.shape[1], x.device)
        for block in self.h.values():
            x = block(x, positions)
        return self.ln_f(x) if self.is_last else x

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The last stage's: mean cross-entropy of the tied head's logits, as Bloom.forward."""
        return self.kernels.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]),
                                                 self.word_embeddings.weight, labels.reshape(-1))


def build_stage(model: Bloom, stage: int, num_stages: int) -> BloomStage:
    return BloomStage(model, stage, num_stages)


def stage_tensors(tensors, stage_names: set[str], model_names: set[str]) -> dict:
    """A checkpoint's tensors (weights `<name>` or moments `<name>.<key>`) this stage holds,
    once the checkpoint is known to be the whole model's (ValueError naming the difference)."""
    base = {name: name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1] in parallel.MOMENTS else name
            for name in tensors}
    missing, unexpected = sorted(model_names - set(base.values())), sorted(set(base.values()) - model_names)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return {name: tensors[name] for name, b in base.items() if b in stage_names}


class PipelineEngine:
    """What the trainer calls on an engine, for one pipeline stage of a data-parallel replica.

    The schedule runs a whole step's micro-batches at once, so the trainer hands over all of
    them (`step_batch`) rather than driving forward/backward per micro-batch."""

    def __init__(self, stage: BloomStage, optimizer, cfg: TrainerConfig, groups: dict, device: torch.device):
        self.module, self.optimizer, self.device = stage, optimizer, device
        self.groups = groups  # pp, dp, tp, tied (None where this rank has no part in one)
        self.micro_batch, self.num_stages = cfg.training.micro_batch_size, cfg.parallel.pipeline
        self.bf16 = False
        self.sharded = False  # FSDP2 over the stage's data-parallel replicas (shard_over_replicas)
        self.model_names: set[str] = set()
        self._accumulation = 1
        self._schedules: dict[int, object] = {}

    @classmethod
    def create(cls, model: Bloom, cfg: TrainerConfig, world: parallel.World, device) -> "PipelineEngine":
        """This rank's stage of `model` (the same weights on every rank), sharded over its
        tensor group when parallel.tensor > 1, its optimizer and groups."""
        num_stages, tensor = cfg.parallel.pipeline, cfg.parallel.tensor
        mesh = pipeline_mesh(device.type, world.world_size, num_stages, tensor)
        groups = pipeline_groups(mesh, world.rank)
        stage = build_stage(model, mesh.get_coordinate()[1], num_stages)
        if tensor > 1:
            tensor_parallel.parallelize(stage, mesh["tp"])
        sharded = shard_over_replicas(stage, mesh)
        optimizer = parallel.build_optimizer(stage, cfg, world)
        if sharded:  # DTensor parameters: the verdict read on the host (GuardedAdamW.clip_on_device)
            optimizer.clip_on_device = False
        engine = cls(stage, optimizer, cfg, groups, device)
        engine.sharded = sharded
        engine.bf16 = parallel.precision(cfg, world) == "bf16"
        engine.model_names = {name for name, _ in model.named_parameters()}
        return engine

    # ---------------------------------------------------------- the trainer's interface

    def train(self) -> None:
        self.module.train()

    def gradient_accumulation_steps(self) -> int:
        return self._accumulation

    def set_train_batch_size(self, global_batch: int) -> None:
        data_size = dist.get_world_size(self.groups["dp"]) if self.groups["dp"] is not None else 1
        self._accumulation = parallel.gradient_accumulation(global_batch, self.micro_batch, data_size)

    def get_global_grad_norm(self) -> None:
        return None  # step_batch measures it

    def zero_optimization_stage(self) -> int:
        """0 for parallel.py's state helpers: AdamW's state is per (stage) parameter."""
        return 0

    def stage_names(self) -> set[str]:
        return {name for name, _ in self.module.named_parameters()}

    def step_batch(self, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step over this replica's micro-batches, (B, T + 1) token ids each.
        Returns (the summed loss of the micro-batches: 0 but on the last stage, the gradient
        norm over every stage); the optimizer skips the step on every rank when either is
        not finite on any."""
        losses: list[torch.Tensor] = []
        kwargs: dict = {}
        if self.module.is_first:
            kwargs["arg_mbs"] = [(b[:, :-1],) for b in batches]
        if self.module.is_last:
            kwargs.update(target_mbs=[b[:, 1:] for b in batches], losses=losses)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            self._schedule(len(batches)).step(return_outputs=False, **kwargs)
        self._reduce_gradients()
        grad_norm = self.gradient_norm()
        loss_sum = torch.stack(losses).float().sum() if losses else torch.zeros((), device=self.device)
        self.optimizer.guard_next_step(loss_sum.detach(), grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum.detach(), grad_norm

    # ------------------------------------------------------------------------ steps

    def _schedule(self, num_micro_batches: int):
        """The schedule for this many micro-batches (the ramp-up changes it): made once each."""
        if num_micro_batches not in self._schedules:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            stage = PipelineStage(self.module, self.module.stage, self.num_stages, self.device,
                                  group=self.groups["pp"])
            kind = Schedule1F1B if num_micro_batches >= self.num_stages else ScheduleGPipe
            # scale_grads: gradients are the micro-batches' mean, as DeepSpeed's accumulation.
            self._schedules[num_micro_batches] = kind(stage, num_micro_batches, loss_fn=self.module.loss,
                                                      scale_grads=True)
        return self._schedules[num_micro_batches]

    @torch.no_grad()
    def _reduce_gradients(self) -> None:
        """The tied weight's two gradients summed (first and last stage). Over the replicas
        FSDP2 has already averaged every gradient in the schedule's last backward (its
        reduce-scatter), leaving each rank its dp shard: the first stage's embedding and the
        last stage's head copy are sharded alike (the same shape, the same dp mesh), so
        matching ranks of the tied group hold the same rows, and the sum of the two averages
        is the average of the sums."""
        _match_placements(self.module)
        if self.groups["tied"] is not None:  # a DTensor's local shard: the matching tp and dp rank's
            tied = tensor_parallel.local_part(self.module.word_embeddings.weight.grad)
            dist.all_reduce(tied, group=self.groups["tied"])

    @torch.no_grad()
    def gradient_norm(self) -> torch.Tensor:
        """The L2 norm of the whole model's gradient: each stage's squared norm, the head's
        copy left out (the first stage counts the tied weight once), summed over the tensor
        group, the replicas when FSDP2 shards over them (each rank's squares are of its dp
        shard) and the pipeline. A rank's squares of a shard count whole, of a DTensor
        replicated over k of its mesh's ranks (LayerNorms over tp: the same gradient on every
        tensor rank) 1/k each."""
        grads = [p.grad for name, p in self.module.named_parameters()
                 if p.grad is not None and not (name == HEAD and self.module.holds_head_copy())]
        squared = torch.zeros((), dtype=torch.float64, device=self.device)
        if grads:
            norms = torch.stack(torch._foreach_norm([tensor_parallel.local_part(g) for g in grads])).double()
            squared = (norms ** 2 * torch.tensor([_share(g) for g in grads], dtype=torch.float64)).sum()
        if self.groups["tp"] is not None:
            dist.all_reduce(squared, group=self.groups["tp"])
        if self.sharded:
            dist.all_reduce(squared, group=self.groups["dp"])
        dist.all_reduce(squared, group=self.groups["pp"])
        return squared.sqrt().float()


@torch.no_grad()
def _match_placements(module: nn.Module) -> None:
    """Each DTensor gradient in its parameter's placements. The first stage's embedding lookup
    leaves its vocabulary-sharded weight a Replicate() gradient, the full (384, 32) table on
    both tensor ranks where the weight holds (192, 32) rows (seen at T2 x P2: the tied sum with
    the last stage's Shard(0) gradient aborted in gloo, 12288 vs 6144 bytes). The full table is
    the same on every tensor rank (the same ids and output gradient), so its slice is this
    rank's shard, taken without communication."""
    for param in module.parameters():
        grad = param.grad
        if isinstance(grad, DTensor) and grad.placements != param.placements:
            param.grad = grad.redistribute(param.device_mesh, param.placements)


def _share(grad: torch.Tensor) -> float:
    """The weight of a rank's squared norm of `grad` in the sum over its mesh: 1 for a plain
    tensor or a shard, 1/T for a DTensor replicated over the T tensor ranks (under FSDP2:
    (dp shard, tp replicate), dp distinct pieces of dp x T ranks)."""
    if not isinstance(grad, DTensor):
        return 1.0
    return tensor_parallel.distinct_shards(grad) / grad.device_mesh.size()


def shard_over_replicas(stage: nn.Module, mesh: DeviceMesh) -> bool:
    """FSDP2 over the mesh's dp dimension when it has more than one replica, as mesh_engine:
    one all-gather and one reduce-scatter per block, the stage's own embedding, ln_f and
    head copy in the root's. Whether it sharded."""
    if mesh["dp"].size() == 1:
        return False
    from torch.distributed.fsdp import fully_shard

    for block in stage.h.values():
        fully_shard(block, mesh=mesh["dp"], reshard_after_forward=False)
    fully_shard(stage, mesh=mesh["dp"], reshard_after_forward=False)
    return True


MESH_DIMS = ("dp", "pp", "tp")


def pipeline_mesh(device: str, world_size: int, num_stages: int, tensor: int = 1) -> DeviceMesh:
    """The (dp, pp, tp) mesh, tensor innermost: rank = (data x P + stage) x T + tensor_rank."""
    replicas = parallel.data_replicas(world_size, tensor, num_stages)
    return init_device_mesh(device, (replicas, num_stages, tensor), mesh_dim_names=MESH_DIMS)


def pipeline_groups(mesh: DeviceMesh, rank: int) -> dict:
    """This rank's groups: its pipeline (`pp`: the same tensor rank of each stage of its
    replica), its stage's data-parallel group (`dp`), its tensor group (`tp`, None when T = 1),
    and the tied embedding's (`tied`: its pipeline's first and last rank; None on a middle
    stage). Every rank creates every tied group, in the same order, as torch.distributed
    requires (the mesh creates the others)."""
    ranks = mesh.mesh  # (dp, pp, tp) -> global rank
    num_stages, tensor = ranks.shape[1], ranks.shape[2]
    groups = {"pp": mesh["pp"].get_group(), "dp": mesh["dp"].get_group(),
              "tp": mesh["tp"].get_group() if tensor > 1 else None}
    if num_stages == 2:  # first and last are the whole pipeline
        groups["tied"] = groups["pp"]
        return groups
    groups["tied"] = None
    for pipeline in ranks.permute(0, 2, 1).reshape(-1, num_stages).tolist():  # (dp x tp) pipelines
        group = dist.new_group([pipeline[0], pipeline[-1]])
        if rank in (pipeline[0], pipeline[-1]):
            groups["tied"] = group
    return groups
