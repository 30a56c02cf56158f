"""The training loop: one DeepSpeed engine, exact resume, non-finite guard, rollback, metrics.

Every decision that ranks must agree on (stop now, save now, was this step bad) travels in
one small all-reduce per step, so ranks never diverge even when only one of them sees a
SIGTERM, a clock tick or a poisoned batch. Faults for tests (poisoned samples, a per-step
trace, a hang) come in as a FaultHooks object (faults.py), which does nothing unless a test
asked for one.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from bloomrun.trainer import checkpoint as ckpt
from bloomrun.trainer import elastic, parallel, runlock, watchdog
from bloomrun.trainer import heartbeat as hb
from bloomrun.trainer.config import TrainerConfig
from bloomrun.trainer.faults import FaultHooks
from bloomrun.trainer.identity import check_init_from, check_resume, compatibility, identity_from_env
from bloomrun.trainer.mesh_engine import MeshEngine
from bloomrun.trainer.metrics import TrainerMetrics, flops_per_token, peak_flops, throughput
from bloomrun.trainer.pipeline import PipelineEngine
from bloomrun.trainer.schedule import (
    decay_tokens,
    global_batch_size_at,
    learning_rate,
    micro_batches,
    rank_sample_indices,
    run_length,
    samples_trained,
    skip_past,
)

log = logging.getLogger("bloomrun.trainer")

# Exit status of ranks that stop because a peer got SIGTERM (EX_TEMPFAIL): non-zero, so
# torchrun restarts them into a new rendezvous rather than ending the run as finished.
EXIT_PEER_STOPPED = 75


@dataclass(frozen=True)
class StepResult:
    """One optimiser step, as every rank agreed on it (but `sample_indices`: this rank's)."""

    step: int
    loss: float
    grad_norm: float  # NaN when the update was skipped
    lr: float
    applied: bool
    seconds: float
    samples: int  # the global batch
    sample_indices: list[int]
    stop_requested: bool
    save_due: bool


def run_labels(env=os.environ) -> tuple[str, str]:
    """(namespace, run) for metric labels: the run's identity (identity.py reads what the
    operator and bloomctl set); a local run's namespace label is `local` unless
    BLOOMRUN_NAMESPACE names one."""
    identity = identity_from_env(env)
    return identity.namespace or env.get("BLOOMRUN_NAMESPACE") or "local", identity.name


def build_engine(model: torch.nn.Module, cfg: TrainerConfig, world: parallel.World,
                 device: torch.device) -> tuple[object, torch.optim.Optimizer]:
    """(engine, optimizer) for the run's layout, AdamW's state created (init_optimizer_state);
    the engine's batch size is the caller's to set, per step."""
    if cfg.parallel.pipeline > 1:
        # This rank's stage under torch.distributed.pipelining, sharded over its tensor group
        # when parallel.tensor > 1 (T x P), whole pipelines data-parallel (pipeline.py).
        engine = PipelineEngine.create(model, cfg, world, device)
        optimizer = engine.optimizer
    elif cfg.parallel.tensor > 1:
        # DTensor TP + FSDP2: DeepSpeed's engine takes no DTensor parameters (mesh_engine.py).
        engine = MeshEngine.create(model, cfg, world, device)
        optimizer = engine.optimizer
    else:
        optimizer = parallel.build_optimizer(model, cfg, world)
        # Sized for one micro-batch per rank, which every world size divides: the batch of
        # step 0 (the ramp's first) may not suit this world when resuming past the ramp on
        # more ranks; Trainer._set_batch_size sets each step's own batch before it runs.
        ds_config = parallel.build_deepspeed_config(cfg, world, cfg.training.micro_batch_size * world.world_size)
        engine = parallel.create_engine(model, optimizer, ds_config, world)
    parallel.init_optimizer_state(engine, optimizer)
    return engine, optimizer


class Trainer:
    """`Trainer(cfg).fit()` on every rank; `train_step()` alone for benchmarks and tests."""

    def __init__(self, cfg: TrainerConfig, world: parallel.World | None = None, *,
                 faults: FaultHooks = FaultHooks(), serve_metrics: bool = True):
        """A run's set-up, in the order it must happen (the group formed, then data checked
        before anything starts, the lock after, the model, the engine before its state), one or
        two lines a step under a comment each: longer than 60 lines on purpose, since split
        into helpers the order would no longer read from top to bottom (torchtitan's
        Trainer.__init__ is written the same way)."""
        from bloomrun.trainer.data import build_train_samples, data_cache_dir, validate_data
        from bloomrun.trainer.model import ModelArgs, build_model

        self.cfg, self.faults = cfg, faults
        self.world = world = world or parallel.World.from_env()
        self.args = ModelArgs.from_config(cfg.model)
        self.checkpoint_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
        # Hang detection first, so that everything after it is watched (watchdog.py).
        self.guard = watchdog.guard(cfg.watchdog, world.rank, world.local_rank,
                                    int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        self.heartbeat = self.guard.heartbeat

        # Distributed first, so every rank is in the group before anyone waits on another:
        # DeepSpeed picks its accelerator and JIT cache at import.
        parallel.prepare_environment(elastic.cache_dir(os.environ), world)
        parallel.init_distributed(world)

        # Data: checked before anything else runs, so a bad file fails with its name, at once.
        # Rank 0 alone: the first start reads every token (later ones a bounded sample: the
        # data cache records the scan); the others wait for its verdict with no collective
        # timeout to hit (parallel.checked_on_rank_zero), and refuse with its message.
        data_cache = data_cache_dir(cfg.checkpoint.dir)
        parallel.checked_on_rank_zero(
            lambda: validate_data(cfg.data, cfg.model.shape().vocab_size, self.args.seq_length, cache_dir=data_cache),
            world, self.heartbeat.beat, key="bloomrun/data-checked")
        self.samples = build_train_samples(cfg.data, self.args.seq_length, cache_dir=data_cache)
        # One trainer per checkpoint folder: rank 0 holds its lock while it lives (runlock.py).
        # Taken after the data check, so a run refused for its data leaves no folder behind.
        self.run_lock = runlock.acquire(self.checkpoint_dir) if self.checkpoint_dir and world.rank == 0 else None
        self.device = parallel.rank_device(world)
        self.precision = parallel.precision(cfg, world)

        # Run length and the decay length depend only on the config: every rank computes the same.
        self.target_steps, run_tokens = run_length(cfg.training, self.args.seq_length)
        self.decay_tokens = decay_tokens(cfg.optim, run_tokens)

        # Model: the same seed on every rank gives the same initial weights; kernels chosen
        # for this device; compiled in place, so parameter names stay the checkpoint's.
        torch.manual_seed(cfg.training.seed)
        model = build_model(cfg.model, self.device)
        self.num_parameters = model.num_parameters()
        if cfg.training.compile:
            model.compile()

        # Optimizer and engine; AdamW state exists from the start (see init_optimizer_state).
        # Each rank reads the samples of its data-parallel replica (a tensor group shares them).
        self.data_rank, self.data_size = parallel.data_parallel(cfg, world)
        self.engine, self.optimizer = build_engine(model, cfg, world, self.device)
        # DeepSpeed records the gradient norm only when ZeRO (1-3) computes it; under stage 0
        # the trainer measures it, and the optimizer clips and guards with it.
        self._measure_grad_norm = parallel.optimizer_clips(cfg, world)

        # Bookkeeping: what checkpoints carry (whose they are and what they fit, so a run
        # resumes only its own: identity.py), then the loop's own.
        self.state = ckpt.TrainState()
        # Sharded checkpoints need DTensor parameters (the tensor-parallel engine); pipeline
        # stages always write their own shards (no rank holds the whole model to consolidate).
        self.checkpoint_layout = ckpt.SHARDED if cfg.parallel.pipeline > 1 or (
            cfg.checkpoint.format == "sharded" and cfg.parallel.tensor > 1) else ckpt.CONSOLIDATED
        self.identity = identity_from_env()
        self.compatibility = compatibility(cfg)
        self.warm_started_from: dict | None = None  # recorded in every checkpoint after one
        self.last_checkpoint_step: int | None = None
        self.last_checkpoint_time: float | None = None
        self._last_save_clock = time.monotonic()
        self._bad_streak = 0
        self._bad_streak_start = 0
        self._stop_requested = False
        self._last_progress: tuple[float | None, float | None] = (None, None)  # (loss, tokens/s)
        # Where this process's time went, for the operator's goodput accounting (progress.Timing).
        self.started_at, self.resumed_step = time.time(), 0
        self.step_seconds = self.checkpoint_seconds = 0.0

        # Throughput arithmetic; metrics on each node's local rank 0; progress from rank 0.
        self.flops_per_token = flops_per_token(self.num_parameters, self.args)
        device_name = torch.cuda.get_device_name(self.device) if world.is_cuda else "cpu"
        self.peak_flops = peak_flops(device_name, self.precision)
        self.metrics = self._start_metrics(serve_metrics) if world.local_rank == 0 else None
        self.reporter = self._progress_reporter()
        if world.rank == 0:
            self._log_start(device_name)
            if self.checkpoint_layout != cfg.checkpoint.format:
                log.info("checkpoint.format consolidated: pipeline stages write their own shards; writing "
                         "sharded checkpoints (checkpoint_sharded.py consolidates one offline)"
                         if cfg.parallel.pipeline > 1 else
                         "checkpoint.format sharded: parallel.tensor 1 runs on DeepSpeed, whose ZeRO partitions "
                         "cannot be written as shards; writing consolidated checkpoints")

    # ------------------------------------------------------------------ helpers

    def _log_start(self, device_name: str) -> None:
        log.info(
            "model %s: %.1fM parameters, %.3g FLOPs/token; %d ranks (TP %d x %sDP %d) on %s, %s, ZeRO %d; %d steps",
            self.cfg.model.preset or "custom", self.num_parameters / 1e6, self.flops_per_token,
            self.world.world_size, self.cfg.parallel.tensor,
            f"PP {self.cfg.parallel.pipeline} x " if self.cfg.parallel.pipeline > 1 else "", self.data_size,
            device_name, self.precision,
            parallel.zero_stage(self.cfg, self.world), self.target_steps,
        )

    def _start_metrics(self, serve: bool) -> TrainerMetrics:
        metrics = TrainerMetrics(*run_labels(), node_rank=self.world.node_rank)
        metrics.target_steps.set(self.target_steps)
        metrics.start_totals(tokens=0, skipped_steps=0, rollbacks=0)  # resume() restores the run's
        minutes = self.cfg.checkpoint.every_minutes
        metrics.checkpoint_interval.set(minutes * 60 if minutes else 0)
        metrics.watch_ranks(self.guard.compute_seconds)
        if serve:
            self.metrics_port = metrics.serve(self.cfg.metrics.port, self._port_file())
        return metrics

    def _port_file(self) -> str | None:
        """Only where the launcher asks (bloomctl run): a path derived from checkpoint.dir
        was /metrics-port in a pod, which the non-root container cannot write. Node N of a
        launch that shares the machine and the variable gets its own file."""
        path = os.environ.get(elastic.METRICS_PORT_FILE_ENV)
        if not path or self.world.node_rank == 0:
            return path or None
        return f"{path}.node{self.world.node_rank}"

    def _progress_reporter(self):
        if self.world.rank != 0:
            return None
        from bloomrun.trainer.progress import ProgressReporter

        return ProgressReporter.from_env()

    def _all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        tensor = values.to(self.device)
        if self.world.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.cpu()

    def request_stop(self, *_args) -> None:
        """SIGTERM handler: finish the current step, checkpoint, exit 0."""
        self._stop_requested = True

    def _tokens_of(self, samples: int) -> int:
        return samples * self.args.seq_length

    # ------------------------------------------------------------------ one step

    def train_step(self) -> StepResult:
        """One optimiser step over the global batch that starts at consumed_samples."""
        training = self.cfg.training
        skipped = self.state.skipped_ranges
        consumed = self.state.consumed_samples = skip_past(self.state.consumed_samples, skipped)
        global_batch = self._set_batch_size(consumed)
        indices = rank_sample_indices(consumed, global_batch, self.data_rank, self.data_size,
                                      training.micro_batch_size)
        lr = learning_rate(self._tokens_of(samples_trained(consumed + global_batch, skipped)), self.cfg.optim,
                           self.decay_tokens)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        start = time.perf_counter()
        loss_sum, measured_norm, compute_seconds = self._forward_backward(indices)
        loss_sum, stop_requested, time_due = self._agree(loss_sum)  # synchronises the device
        seconds = time.perf_counter() - start
        applied = bool(self.optimizer.take_applied())  # maybe a device flag: read after the sync
        grad_norm = self.engine.get_global_grad_norm() if measured_norm is None else measured_norm
        grad_norm = float(grad_norm) if grad_norm is not None and applied else math.nan

        self.state.step += 1
        self.state.consumed_samples += global_batch
        self.state.tokens = self._tokens_of(samples_trained(self.state.consumed_samples, skipped))
        if applied:
            self.state.optimizer_steps += 1
        self.step_seconds += seconds
        self.heartbeat.step_done(self.state.step, seconds, compute_seconds())
        every = self.cfg.checkpoint.every_steps
        return StepResult(
            step=self.state.step, loss=loss_sum / (global_batch // training.micro_batch_size), grad_norm=grad_norm,
            lr=lr, applied=applied, seconds=seconds, samples=global_batch, sample_indices=indices,
            stop_requested=stop_requested,
            save_due=time_due or (every is not None and self.state.step % every == 0),
        )

    def _set_batch_size(self, consumed: int) -> int:
        """The step's global batch; the engine is told when the ramp-up changes it."""
        global_batch = global_batch_size_at(consumed, self.cfg.training)
        accumulation = parallel.gradient_accumulation(global_batch, self.cfg.training.micro_batch_size,
                                                      self.data_size)
        if accumulation != self.engine.gradient_accumulation_steps():
            self.engine.set_train_batch_size(global_batch)
        return global_batch

    def _forward_backward(self, indices: list[int]):
        """This rank's micro-batches through the engine, which steps the optimizer after the
        last. Returns the rank's summed loss (on the device), under stage 0 the gradient norm
        the trainer measured (None: DeepSpeed measured it), and a function giving this rank's
        own compute seconds (read it after the step's sync)."""
        self.engine.train()
        if isinstance(self.engine, PipelineEngine):
            return self._pipeline_step(indices)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        grad_norm = None
        compute_start = compute_end = self._clock()
        for micro in micro_batches(indices, self.cfg.training.micro_batch_size):
            self.heartbeat.beat()
            batch = self._batch(micro)
            loss = self.faults.poisoned_loss(self.engine(batch[:, :-1], labels=batch[:, 1:]), micro)
            if self.engine.is_gradient_accumulation_boundary():
                # This rank's own work ends here: the gradient reduction that follows waits for
                # the slowest rank, so only the time before it shows a straggler.
                compute_end = self._clock()
            self.engine.backward(loss)
            loss_sum += loss.detach().float()
            if self.engine.is_gradient_accumulation_boundary():
                # The optimizer's guard: a non-finite loss on any rank skips the update.
                grad_norm = parallel.gradient_norm(self.engine.module) if self._measure_grad_norm else None
                self.optimizer.guard_next_step(loss_sum, grad_norm)
            self.engine.step()
        return loss_sum, grad_norm, lambda: self._seconds_between(compute_start, compute_end)

    def _pipeline_step(self, indices: list[int]):
        """_forward_backward for a pipeline stage: the schedule runs the step's micro-batches
        together and steps the optimizer; the loss is the last stage's (0 on the others, so the
        all-reduce in _agree counts each replica's once), the norm the whole model's."""
        self.heartbeat.beat()
        compute_start = self._clock()
        batches = [self._batch(micro) for micro in micro_batches(indices, self.cfg.training.micro_batch_size)]
        loss_sum, grad_norm = self.engine.step_batch(batches)
        compute_end = self._clock()
        return loss_sum, grad_norm, lambda: self._seconds_between(compute_start, compute_end)

    def _batch(self, micro: list[int]) -> torch.Tensor:
        """The micro-batch's samples as one (B, T + 1) tensor of token ids on the device."""
        return torch.from_numpy(np.stack([self.samples[i] for i in micro])).to(self.device, non_blocking=True)

    def _clock(self):
        """A point on this rank's timeline: a CUDA event on a GPU (read after the step's sync,
        so timing costs no stall), the host clock on the CPU."""
        if self.world.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def _seconds_between(start, end) -> float:
        return start.elapsed_time(end) / 1000 if isinstance(start, torch.cuda.Event) else end - start

    def _agree(self, loss_sum: torch.Tensor) -> tuple[float, bool, bool]:
        """(the loss summed over every rank's micro-batches, a stop asked on some rank, a
        checkpoint due by the clock on some rank), in one all-reduce."""
        minutes = self.cfg.checkpoint.every_minutes
        time_due = minutes is not None and time.monotonic() - self._last_save_clock >= minutes * 60
        agreed = self._all_reduce(torch.stack([
            # Every rank of a tensor group holds its replica's whole loss: counted once.
            loss_sum.double().cpu() / self.cfg.parallel.tensor,
            torch.tensor(float(self._stop_requested), dtype=torch.float64),
            torch.tensor(float(time_due), dtype=torch.float64),
        ]))
        return float(agreed[0]), bool(agreed[1] > 0), bool(agreed[2] > 0)

    def train_steps(self, num_steps: int) -> list[float]:
        """Run `num_steps` steps without checkpoints or logs; return each step's seconds.

        The benchmark entry point: the real step (engine, accumulation, guard, all-reduce),
        timed from the first micro-batch to the agreed loss (which synchronises the device).
        """
        return [self.train_step().seconds for _ in range(num_steps)]

    # ------------------------------------------------------------- bookkeeping

    def _after_step(self, result: StepResult) -> None:
        """Counters, the bad-step streak and rollback, metrics, the log line, progress."""
        if result.applied:
            self._bad_streak = 0
        else:
            if self._bad_streak == 0:
                self._bad_streak_start = self.state.consumed_samples - result.samples
            self._bad_streak += 1
            self.state.skipped_steps += 1
            if self.world.rank == 0:
                log.warning("step %d: non-finite loss or gradient (loss %s); update skipped (%d in a row)",
                            result.step, result.loss, self._bad_streak)
        self._publish_metrics(result)
        if self._bad_streak >= self.cfg.training.nan_policy.max_consecutive_bad_steps:
            self.rollback()

    def _publish_metrics(self, result: StepResult) -> None:
        rates = throughput(self._tokens_of(result.samples), result.samples, result.seconds,
                           self.world.world_size, self.flops_per_token, self.peak_flops)
        memory = (torch.cuda.max_memory_allocated(self.device) if self.world.is_cuda
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if self.metrics is not None:
            m = self.metrics
            m.step.set(result.step)
            m.tokens.set(self.state.tokens)
            m.tokens_per_second.set(rates.tokens_per_second)
            m.samples_per_second.set(rates.samples_per_second)
            m.tflops.set(rates.tflops_per_device)
            m.mfu.set(rates.mfu)
            m.loss.set(result.loss if math.isfinite(result.loss) else math.nan)
            m.learning_rate.set(result.lr)
            m.grad_norm.set(result.grad_norm)
            m.skipped_steps.set(self.state.skipped_steps)
            m.rollbacks.set(self.state.rollbacks)
            m.restarts.set(self.state.restarts)
            if self.world.is_cuda:
                m.gpu_memory().set(memory)
        if self.world.rank == 0:
            if result.step % self.cfg.metrics.log_every == 0 or not result.applied:
                log.info(
                    "step %d/%d | loss %.4f | grad_norm %.3f | lr %.3e | tokens/s %.0f | TFLOP/s %.2f | MFU %s | mem %.2f GB%s",
                    result.step, self.target_steps, result.loss, result.grad_norm, result.lr,
                    rates.tokens_per_second, rates.tflops_per_device,
                    "n/a" if math.isnan(rates.mfu) else f"{rates.mfu:.1%}", memory / 2**30,
                    "" if result.applied else " | SKIPPED",
                )
            self._last_progress = (result.loss if math.isfinite(result.loss) else None, rates.tokens_per_second)
            if self.reporter is not None:
                self.reporter.report(result.step, self.target_steps, self.state.tokens, *self._last_progress,
                                     timing=self._timing())

    # ----------------------------------------------------------- checkpoints

    def save(self) -> None:
        """Checkpoint the current state (every rank calls it; see checkpoint.save)."""
        if self.checkpoint_dir is None:
            return
        with self.heartbeat.phase_of(hb.CHECKPOINT):  # the watchdog allows a save its own time
            self._save()

    def _save(self) -> None:
        start = time.perf_counter()
        self.faults.slow_save(self.world.rank)
        self.state.optimizer_steps = parallel.optimizer_steps(self.optimizer)
        extra = {"world_size": self.world.world_size, "zero_stage": parallel.zero_stage(self.cfg, self.world),
                 "tensor_parallel": self.cfg.parallel.tensor, "pipeline_parallel": self.cfg.parallel.pipeline,
                 "run": self.identity.to_dict(), "compatibility": self.compatibility,
                 "init_from": self.warm_started_from,
                 "loss": self._last_progress[0]}  # rank 0's last step loss: bloomctl's summary
        # Rank 0 prunes; it keeps the checkpoints the run's evaluation Jobs may still read.
        held = self.reporter.held_steps if self.reporter is not None else None
        path = ckpt.save(self.checkpoint_dir, self.state, self.engine, self.optimizer, self.world,
                         self.cfg.checkpoint.keep_last, extra, self.checkpoint_layout, held)
        seconds = time.perf_counter() - start
        self.checkpoint_seconds += seconds
        if path is not None:
            log.info("checkpoint step %d saved to %s in %.2f s", self.state.step, path, seconds)
        self._last_save_clock = time.monotonic()
        self.last_checkpoint_step, self.last_checkpoint_time = self.state.step, time.time()
        if self.metrics is not None:
            self.metrics.checkpoint_seconds.set(seconds)
            self.metrics.checkpoint_step.set(self.state.step)
            self.metrics.checkpoint_time.set(self.last_checkpoint_time)
        if self.reporter is not None:
            self.reporter.report(self.state.step, self.target_steps, self.state.tokens, *self._last_progress,
                                 checkpoint_step=self.state.step, checkpoint_time=self.last_checkpoint_time,
                                 checkpoint_tokens=self.state.tokens, force=True)

    def resume(self) -> bool:
        """Load the newest complete checkpoint, if any, once it proves to be this run's own
        (IdentityError otherwise); counts as a restart. Without one, a warm start if asked."""
        choice = ckpt.choose(self.checkpoint_dir, self.world, self.device) if self.checkpoint_dir else None
        if choice is None:
            if self.cfg.checkpoint.init_from is not None:
                self.warm_start()
            elif self.world.rank == 0 and self.checkpoint_dir is not None:
                log.info("no complete checkpoint in %s: starting at step 0", self.checkpoint_dir)
            return False
        path, meta = choice
        check_resume(str(path), meta, self.identity, self.compatibility)
        self.state = ckpt.load(path, meta, self.engine, self.optimizer, self.world)
        self.warm_started_from = meta.get("init_from")
        self.state.restarts += 1
        self.resumed_step = self.state.step
        self.last_checkpoint_step, self.last_checkpoint_time = self.state.step, meta.get("published_at")
        if self.metrics is not None:
            self.metrics.start_totals(self.state.tokens, self.state.skipped_steps, self.state.rollbacks)
            self.metrics.checkpoint_step.set(self.state.step)
            self.metrics.checkpoint_time.set(meta.get("published_at", 0))
            self.metrics.restarts.set(self.state.restarts)
        if self.world.rank == 0:
            log.info("resumed from %s: step %d, %d samples consumed, restart %d (saved by %s ranks)",
                     path, self.state.step, self.state.consumed_samples, self.state.restarts, meta.get("world_size"))
        return True

    def warm_start(self) -> None:
        """checkpoint.initFrom: another run's weights (and moments, if asked) as this run's
        start, checked to fit; step 0, data from the start, recorded in every checkpoint."""
        init_from = self.cfg.checkpoint.init_from
        path, meta = ckpt.choose_warm_start(Path(init_from.path), self.world)
        check_init_from(str(path), meta, self.cfg)
        ckpt.load_weights(path, meta, self.engine, self.optimizer, init_from.optimizer)
        self.warm_started_from = {"path": str(path), "step": meta["step"], "run": meta.get("run"),
                                  "optimizer": init_from.optimizer}
        if self.world.rank == 0:
            log.info("warm start from %s (run %s, step %d)%s", path, meta.get("run", {}).get("name", "?"),
                     meta["step"], ", with its optimizer state" if init_from.optimizer else "")

    def rollback(self) -> None:
        """BLOOM's remedy for a run that keeps producing bad steps: back to the last good
        checkpoint, replay the good steps after it, and skip exactly the bad streak's samples
        plus skipStepsAfterRollback batches. The skipped range is recorded in every later
        checkpoint; tokens and the learning rate count only samples trained on."""
        policy = self.cfg.training.nan_policy
        skip_end = self.state.consumed_samples
        for _ in range(policy.skip_steps_after_rollback):
            skip_end += global_batch_size_at(skip_end, self.cfg.training)
        skipped_range = [self._bad_streak_start, skip_end]
        counters = (self.state.skipped_steps, self.state.rollbacks + 1, self.state.skipped_ranges + [skipped_range])
        with self.heartbeat.phase_of(hb.CHECKPOINT):
            choice = ckpt.choose(self.checkpoint_dir, self.world, self.device) if self.checkpoint_dir else None
            if choice is not None:
                self.state = ckpt.load(*choice, self.engine, self.optimizer, self.world)
        if choice is not None:
            where = f"checkpoint step {choice[1]['step']}"
        else:
            # Bad steps never reached the weights, so the current ones are as good as any.
            where = "the current weights (no checkpoint yet)"
        self.state.skipped_steps, self.state.rollbacks, self.state.skipped_ranges = counters
        # From here train_step replays up to the range and jumps over it (skip_past).
        self.state.tokens = self._tokens_of(samples_trained(self.state.consumed_samples, self.state.skipped_ranges))
        self._bad_streak = 0
        if self.metrics is not None:
            self.metrics.rollbacks.set(self.state.rollbacks)
            self.metrics.step.set(self.state.step)
        if self.world.rank == 0:
            log.warning("rollback %d: %d bad steps in a row; back to %s, skipping samples [%d, %d)",
                        self.state.rollbacks, policy.max_consecutive_bad_steps, where, *skipped_range)

    # ------------------------------------------------------------------ the run

    def fit(self) -> int:
        """Resume, train to the target, checkpoint on schedule and on SIGTERM; exit status 0."""
        signal.signal(signal.SIGTERM, self.request_stop)
        self.resume()
        if self.reporter is not None:  # a new session: the operator counts a restart's cost from here
            self.reporter.report(self.state.step, self.target_steps, self.state.tokens, None, None,
                                 timing=self._timing(), force=True)
        while self.state.step < self.target_steps:
            result = self.train_step()
            self.faults.record(result, self.world.rank, self.world.world_size)
            self._after_step(result)
            done = self.state.step >= self.target_steps
            if result.stop_requested or done or (result.save_due and result.applied):
                self.save()
            if result.stop_requested:
                return self._stop_code()
            self.faults.pause_after(self.state.step)
        if self.world.rank == 0:
            log.info("training complete: %d steps, %d tokens", self.state.step, self.state.tokens)
        if self.last_checkpoint_step != self.state.step:
            self.save()
        return 0

    def _timing(self):
        from bloomrun.trainer.progress import Timing

        return Timing(self.started_at, self.resumed_step, self.step_seconds, self.checkpoint_seconds)

    def _stop_code(self) -> int:
        """Exit status after a SIGTERM stop, once its checkpoint is saved.

        Ranks whose own process got the SIGTERM (a deleted pod, Ctrl-C, the budget stop)
        exit 0. Ranks stopped only because a peer was (the stop is agreed collectively)
        exit EXIT_PEER_STOPPED, so that their torchrun agent re-forms the group without the
        departed node and resumes from the checkpoint just saved; exiting 0 there would end
        the whole run as if training had finished."""
        if self._stop_requested:
            if self.world.rank == 0:
                log.warning("SIGTERM: checkpoint at step %d saved, stopping", self.state.step)
            return 0
        log.warning("a peer got SIGTERM: checkpoint at step %d saved, leaving for torchrun to "
                    "re-form the group (exit %d)", self.state.step, EXIT_PEER_STOPPED)
        return EXIT_PEER_STOPPED

    def close(self) -> None:
        self.guard.close()
        if self.reporter is not None:
            self.reporter.close()
        if self.run_lock is not None:
            self.run_lock.release()
