"""The training loop: one DeepSpeed engine, exact resume, non-finite guard, rollback, metrics.

Every decision that ranks must agree on (stop now, save now, was this step bad) travels in
one small all-reduce per step, so ranks never diverge even when only one of them sees a
SIGTERM, a clock tick or a poisoned batch.

Test hooks (environment variables, read once at start; see docs/trainer.md):
    BLOOMRUN_POISON_SAMPLES=A:B   a micro-batch holding a global sample index in [A, B) gets a
                                  NaN loss, as corrupt data would; drives the rollback tests
    BLOOMRUN_TRACE_FILE=PATH      each rank appends one JSON line per step to PATH.rank<R>:
                                  step, sample indices, loss, lr, whether the update applied
    BLOOMRUN_TEST_HANG_AFTER_STEP=K  every rank sleeps after step K (and its checkpoint), so a
                                  test can kill the run at a known point
"""

from __future__ import annotations

import json
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
from bloomrun.trainer import elastic, parallel
from bloomrun.trainer.config import TrainerConfig
from bloomrun.trainer.metrics import TrainerMetrics, flops_per_token, peak_flops, throughput
from bloomrun.trainer.schedule import (
    decay_tokens,
    global_batch_size_at,
    learning_rate,
    micro_batches,
    rank_sample_indices,
    run_length,
)

log = logging.getLogger("bloomrun.trainer")

POISON_ENV = "BLOOMRUN_POISON_SAMPLES"
TRACE_ENV = "BLOOMRUN_TRACE_FILE"
HANG_ENV = "BLOOMRUN_TEST_HANG_AFTER_STEP"
# Exit status of ranks that stop because a peer got SIGTERM (EX_TEMPFAIL): non-zero, so
# torchrun restarts them into a new rendezvous rather than ending the run as finished.
EXIT_PEER_STOPPED = 75


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    applied: bool
    seconds: float
    samples: int
    stop_requested: bool
    save_due: bool


def parse_poison(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    start, _, end = value.partition(":")
    try:
        return int(start), int(end)
    except ValueError:
        raise ValueError(f"{POISON_ENV}={value!r}: expected START:END sample indices") from None


def run_labels(env=os.environ) -> tuple[str, str]:
    """(namespace, run) for metric labels; the operator and bloomctl set these."""
    namespace = env.get("BLOOMRUN_RUN_NAMESPACE") or env.get("BLOOMRUN_NAMESPACE") or "local"
    run = env.get("BLOOMRUN_RUN_NAME") or env.get("BLOOMRUN_RUN") or "local"
    return namespace, run


class Trainer:
    def __init__(self, cfg: TrainerConfig, world: parallel.World | None = None, serve_metrics: bool = True):
        from bloomrun.trainer.data import build_train_samples, validate_data
        from bloomrun.trainer.model import build_model

        self.cfg = cfg
        self.world = world = world or parallel.World.from_env()
        self.shape = cfg.model.shape()
        self.checkpoint_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None

        # Data: checked before anything else so a bad file fails with its name, at once.
        # Rank 0 alone: the check reads every token, and torchrun stops the others if it fails.
        if world.rank == 0:
            validate_data(cfg.data, self.shape.vocab_size, self.shape.seq_length)
        self.samples = build_train_samples(cfg.data, self.shape.seq_length)

        # Distributed: DeepSpeed picks its accelerator and JIT cache at import.
        parallel.prepare_environment(elastic.cache_dir(os.environ), world)
        parallel.init_distributed(world)
        self.device = torch.device("cuda", world.local_rank) if world.is_cuda else torch.device("cpu")
        self.precision = parallel.precision(cfg, world)
        if world.is_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores
            torch.backends.cudnn.allow_tf32 = True

        # Run length and schedule depend only on the config: every rank computes the same.
        self.target_steps, run_tokens = run_length(cfg.training, self.shape.seq_length)
        self.decay_tokens = decay_tokens(cfg.optim, run_tokens)
        first_batch = global_batch_size_at(0, cfg.training)

        # Model: the same seed on every rank gives the same initial weights.
        torch.manual_seed(cfg.training.seed)
        model = build_model(cfg.model, self.device)  # kernels chosen for this device
        self.num_parameters = model.num_parameters()
        if cfg.training.compile:
            model.compile()  # in place: parameter names stay the checkpoint's names

        # Optimizer and engine; AdamW state exists from the start (see init_optimizer_state).
        self.optimizer = parallel.build_optimizer(model, cfg, world)
        self.ds_config = parallel.build_deepspeed_config(cfg, world, first_batch)
        self.engine = parallel.create_engine(model, self.optimizer, self.ds_config, world)
        parallel.init_optimizer_state(self.engine, self.optimizer)

        # Bookkeeping that checkpoints carry.
        self.state = ckpt.TrainState()
        self.last_checkpoint_step: int | None = None
        self.last_checkpoint_time: float | None = None
        self._last_save_clock = time.monotonic()
        self._bad_streak = 0
        self._bad_streak_start = 0
        self._stop_requested = False
        # DeepSpeed records the global gradient norm only when ZeRO (1-3) computes it; under
        # stage 0 the trainer measures it, and the optimizer clips and guards with it
        # (parallel.optimizer_clips).
        self._measure_grad_norm = parallel.optimizer_clips(cfg, world)
        self._poison = parse_poison(os.environ.get(POISON_ENV))
        self._trace = os.environ.get(TRACE_ENV)
        self._last_progress: tuple[float | None, float | None] = (None, None)  # (loss, tokens/s)

        # Throughput arithmetic, then metrics on each node's local rank 0.
        self.flops_per_token = flops_per_token(self.num_parameters, self.shape)
        device_name = torch.cuda.get_device_name(self.device) if world.is_cuda else "cpu"
        self.peak_flops = peak_flops(device_name, self.precision)
        self.metrics = None
        if world.local_rank == 0:
            self.metrics = TrainerMetrics(*run_labels(), node_rank=world.node_rank)
            self.metrics.target_steps.set(self.target_steps)
            minutes = cfg.checkpoint.every_minutes
            self.metrics.checkpoint_interval.set(minutes * 60 if minutes else 0)
            if serve_metrics:
                self.metrics_port = self.metrics.serve(cfg.metrics.port, self._port_file())
        self.reporter = self._progress_reporter()
        if world.rank == 0:
            log.info(
                "model %s: %.1fM parameters, %.3g FLOPs/token; %d ranks on %s, %s, ZeRO %d; %d steps",
                cfg.model.preset or "custom", self.num_parameters / 1e6, self.flops_per_token, world.world_size,
                device_name, self.precision, parallel.zero_stage(cfg, world), self.target_steps,
            )

    @classmethod
    def from_config(cls, cfg: TrainerConfig, **kwargs) -> "Trainer":
        return cls(cfg, **kwargs)

    # ------------------------------------------------------------------ helpers

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

    def _all_reduce(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        tensor = values if torch.is_tensor(values) else torch.tensor(values, dtype=torch.float64)
        tensor = tensor.to(self.device)
        if self.world.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.cpu()

    def _poisoned(self, indices: list[int]) -> bool:
        return self._poison is not None and any(self._poison[0] <= i < self._poison[1] for i in indices)

    def request_stop(self, *_args) -> None:
        """SIGTERM handler: finish the current step, checkpoint, exit 0."""
        self._stop_requested = True

    def _tokens_of(self, samples: int) -> int:
        return samples * self.shape.seq_length

    # ------------------------------------------------------------------ one step

    def train_step(self) -> StepResult:
        """One optimiser step over the global batch that starts at consumed_samples."""
        training = self.cfg.training
        consumed = self.state.consumed_samples
        global_batch = global_batch_size_at(consumed, training)
        accumulation = parallel.gradient_accumulation(global_batch, training.micro_batch_size, self.world.world_size)
        if accumulation != self.engine.gradient_accumulation_steps():
            self.engine.set_train_batch_size(global_batch)  # batch-size ramp-up
        indices = rank_sample_indices(consumed, global_batch, self.world.rank, self.world.world_size,
                                      training.micro_batch_size)
        lr = learning_rate(self._tokens_of(consumed + global_batch), self.cfg.optim, self.decay_tokens)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        start = time.perf_counter()
        self.engine.train()
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self.optimizer.applied = False
        unclipped_norm = None
        for micro in micro_batches(indices, training.micro_batch_size):
            batch = torch.from_numpy(np.stack([self.samples[i] for i in micro])).to(self.device, non_blocking=True)
            loss = self.engine(batch[:, :-1], labels=batch[:, 1:])
            if self._poisoned(micro):
                loss = loss * float("nan")
            self.engine.backward(loss)
            loss_sum += loss.detach().float()
            # Read by GuardedAdamW at the boundary step: a non-finite loss skips the update.
            self.optimizer.bad_loss = ~torch.isfinite(loss_sum)
            if self._measure_grad_norm and self.engine.is_gradient_accumulation_boundary():
                unclipped_norm = parallel.gradient_norm(self.engine.module)
                self.optimizer.grad_norm = unclipped_norm  # it clips and guards with it
            self.engine.step()

        # One all-reduce for everything ranks must agree on.
        minutes = self.cfg.checkpoint.every_minutes
        time_due = minutes is not None and time.monotonic() - self._last_save_clock >= minutes * 60
        agreed = self._all_reduce(torch.stack([
            loss_sum.double().cpu(), torch.tensor(float(self._stop_requested), dtype=torch.float64),
            torch.tensor(float(time_due), dtype=torch.float64),
        ]))
        seconds = time.perf_counter() - start
        applied = bool(self.optimizer.applied)  # maybe a device flag: the device is synchronised now
        loss = float(agreed[0]) / (accumulation * self.world.world_size)
        grad_norm = self.engine.get_global_grad_norm() if unclipped_norm is None else unclipped_norm
        grad_norm = float(grad_norm) if grad_norm is not None else math.nan

        self.state.step += 1
        self.state.consumed_samples += global_batch
        self.state.tokens = self._tokens_of(self.state.consumed_samples)
        if applied:
            self.state.optimizer_steps += 1
        every = self.cfg.checkpoint.every_steps
        result = StepResult(
            step=self.state.step, loss=loss, grad_norm=grad_norm if applied else math.nan, lr=lr, applied=applied,
            seconds=seconds, samples=global_batch, stop_requested=bool(agreed[1] > 0),
            save_due=bool(agreed[2] > 0) or (every is not None and self.state.step % every == 0),
        )
        if self._trace:
            self._write_trace(result, indices)
        return result

    def train_steps(self, num_steps: int) -> list[float]:
        """Run `num_steps` steps without checkpoints or logs; return each step's seconds.

        The benchmark entry point: the real step (engine, accumulation, guard, all-reduce),
        timed from the first micro-batch to the agreed loss (which synchronises the device).
        """
        return [self.train_step().seconds for _ in range(num_steps)]

    # ------------------------------------------------------------- bookkeeping

    def _write_trace(self, result: StepResult, indices: list[int]) -> None:
        record = {"step": result.step, "rank": self.world.rank, "world_size": self.world.world_size,
                  "indices": indices, "loss": result.loss, "lr": result.lr, "applied": result.applied}
        with open(f"{self._trace}.rank{self.world.rank}", "a") as f:
            f.write(json.dumps(record) + "\n")

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
                self.reporter.report(result.step, self.target_steps, self.state.tokens, *self._last_progress)

    # ----------------------------------------------------------- checkpoints

    def save(self) -> None:
        """Every rank gathers (a collective); rank 0 writes and publishes; all wait for it."""
        if self.checkpoint_dir is None:
            return
        start = time.perf_counter()
        weights, moments = parallel.gather_full_state(self.engine, self.optimizer)
        self.state.optimizer_steps = parallel.optimizer_steps(self.optimizer)
        if self.world.rank == 0:
            rng = {"torch": torch.get_rng_state()}
            if self.world.is_cuda:
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            path = ckpt.publish(self.checkpoint_dir, self.state, weights, moments, rng,
                                extra={"world_size": self.world.world_size,
                                       "zero_stage": parallel.zero_stage(self.cfg, self.world)})
            ckpt.prune(self.checkpoint_dir, self.cfg.checkpoint.keep_last)
            log.info("checkpoint step %d saved to %s in %.2f s", self.state.step, path, time.perf_counter() - start)
        del weights, moments
        if self.world.world_size > 1:
            dist.barrier()
        seconds = time.perf_counter() - start
        self._last_save_clock = time.monotonic()
        self.last_checkpoint_step, self.last_checkpoint_time = self.state.step, time.time()
        if self.metrics is not None:
            self.metrics.checkpoint_seconds.set(seconds)
            self.metrics.checkpoint_step.set(self.state.step)
            self.metrics.checkpoint_time.set(self.last_checkpoint_time)
        if self.reporter is not None:
            self.reporter.report(self.state.step, self.target_steps, self.state.tokens, *self._last_progress,
                                 checkpoint_step=self.state.step, checkpoint_time=self.last_checkpoint_time,
                                 force=True)

    def _choose_checkpoint(self) -> tuple[Path, dict] | None:
        """Rank 0 verifies (checksums) and picks; the others take its choice, so every rank
        loads the same step even if a file changes underneath."""
        choice = ckpt.newest_complete(self.checkpoint_dir) if self.world.rank == 0 else None
        step = torch.tensor([choice[1]["step"] if choice else -1], dtype=torch.int64, device=self.device)
        if self.world.world_size > 1:
            dist.broadcast(step, src=0)
        if int(step) < 0:
            return None
        path = self.checkpoint_dir / ckpt.step_dir_name(int(step))
        return path, (choice[1] if choice else json.loads((path / ckpt.METADATA).read_text()))

    def _load(self, path: Path, meta: dict) -> None:
        weights = ckpt.read_tensors(path, "model.safetensors")
        moments = ckpt.read_tensors(path, "optimizer.safetensors")
        parallel.load_full_state(self.engine, self.optimizer, weights, moments, int(meta["optimizer_steps"]))
        rng = ckpt.read_tensors(path, "rng.safetensors")
        torch.set_rng_state(rng["torch"])
        if self.world.is_cuda and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def resume(self) -> bool:
        """Load the newest complete checkpoint, if any; counts as a restart."""
        if self.checkpoint_dir is None:
            return False
        choice = self._choose_checkpoint()
        if choice is None:
            if self.world.rank == 0:
                log.info("no complete checkpoint in %s: starting at step 0", self.checkpoint_dir)
            return False
        path, meta = choice
        self._load(path, meta)
        self.state = ckpt.TrainState.from_dict(meta)
        self.state.restarts += 1
        self.last_checkpoint_step, self.last_checkpoint_time = self.state.step, meta.get("published_at")
        if self.metrics is not None:
            self.metrics.checkpoint_step.set(self.state.step)
            self.metrics.checkpoint_time.set(meta.get("published_at", 0))
            self.metrics.restarts.set(self.state.restarts)
        if self.world.rank == 0:
            log.info("resumed from %s: step %d, %d samples consumed, restart %d (saved by %s ranks)",
                     path, self.state.step, self.state.consumed_samples, self.state.restarts, meta.get("world_size"))
        return True

    def rollback(self) -> None:
        """BLOOM's remedy for a run that keeps producing bad steps: back to the last good
        checkpoint, and past the data that caused it (plus skipStepsAfterRollback batches)."""
        policy = self.cfg.training.nan_policy
        skip_end = self.state.consumed_samples
        for _ in range(policy.skip_steps_after_rollback):
            skip_end += global_batch_size_at(skip_end, self.cfg.training)
        skipped_range = [self._bad_streak_start, skip_end]
        counters = (self.state.skipped_steps, self.state.rollbacks + 1, self.state.skipped_ranges + [skipped_range])
        choice = self._choose_checkpoint() if self.checkpoint_dir is not None else None
        if choice is not None:
            path, meta = choice
            self._load(path, meta)
            self.state = ckpt.TrainState.from_dict(meta)
            where = f"checkpoint step {meta['step']}"
        else:
            # Bad steps never reached the weights, so the current ones are as good as any.
            where = "the current weights (no checkpoint yet)"
        self.state.skipped_steps, self.state.rollbacks, self.state.skipped_ranges = counters
        self.state.consumed_samples = skip_end
        self.state.tokens = self._tokens_of(skip_end)
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
        while self.state.step < self.target_steps:
            result = self.train_step()
            self._after_step(result)
            done = self.state.step >= self.target_steps
            if result.stop_requested or done or (result.save_due and result.applied):
                self.save()
            if result.stop_requested:
                return self._stop_code()
            if os.environ.get(HANG_ENV) == str(self.state.step):
                time.sleep(3600)
        if self.world.rank == 0:
            log.info("training complete: %d steps, %d tokens", self.state.step, self.state.tokens)
        if self.last_checkpoint_step != self.state.step:
            self.save()
        return 0

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
        if self.reporter is not None:
            self.reporter.close()
