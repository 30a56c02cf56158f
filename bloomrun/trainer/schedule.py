"""The run's schedule: batch size, samples per rank, learning rate and run length, all pure
functions of the config and `consumed_samples`.

The checkpoint stores consumed_samples (the number of global samples every earlier step
used), so a resumed run needs no scheduler state:
- Batch: Megatron's ramp-up gives each step's global batch from consumed_samples alone.
- Samples: step k trains on the global indices [consumed, consumed + global_batch), whatever
  the number of ranks, so a run killed and resumed, on the same or another world size, trains
  on exactly the samples an uninterrupted run would have: the union over ranks of each step's
  indices is the same set. Rank r takes the r-th contiguous slice and cuts it into
  micro-batches in order.
- Learning rate (the paper's recipe, Le Scao et al. 2022): linear warmup over `warmupTokens`, then cosine decay to `minLr`,
  measured in tokens rather than steps, as Megatron-DeepSpeed's `--lr-decay-tokens` does.
  Counting tokens keeps the schedule unchanged when the ramp-up changes how many tokens a
  step holds.
"""

from __future__ import annotations

import math

from bloomrun.trainer.config import OptimConfig, TrainingConfig

# ------------------------------------------------------------------------------ batch


def global_batch_size_at(consumed_samples: int, training: TrainingConfig) -> int:
    """The global batch of the step that starts after `consumed_samples` samples.

    Megatron's --rampup-batch-size START INCREMENT SAMPLES: the batch grows from START by
    INCREMENT in equal stages spread over the first SAMPLES samples, then stays at
    globalBatchSize (BLOOM: 32 -> 2048 over the first ~20M samples). That the increments
    land on globalBatchSize is TrainingConfig's rule, checked once when the config is read.
    """
    target = training.global_batch_size
    ramp = training.rampup
    if ramp is None or consumed_samples >= ramp.samples:
        return target
    num_increments = (target - ramp.start) // ramp.increment
    if num_increments == 0:
        return target
    samples_per_increment = ramp.samples / num_increments
    stage = int(consumed_samples / samples_per_increment)
    return min(ramp.start + stage * ramp.increment, target)


def check_divisible(global_batch: int, world_size: int, micro_batch_size: int = 1) -> None:
    """Every rank must get the same whole number of micro-batches."""
    if world_size < 1 or micro_batch_size < 1:
        raise ValueError(f"world_size ({world_size}) and micro_batch_size ({micro_batch_size}) must be >= 1")
    if global_batch % (world_size * micro_batch_size):
        raise ValueError(
            f"global batch {global_batch} is not divisible by world size {world_size} x micro-batch "
            f"{micro_batch_size} = {world_size * micro_batch_size}: every data-parallel rank must get "
            "the same number of whole micro-batches (choose globalBatchSize, rampup.start and "
            "rampup.increment as multiples of it)"
        )


def rank_sample_indices(consumed_samples: int, global_batch: int, rank: int, world_size: int,
                        micro_batch_size: int = 1) -> list[int]:
    """The global sample indices rank `rank` trains on in the step starting at `consumed_samples`:
    the rank-th contiguous block of global_batch // world_size samples."""
    check_divisible(global_batch, world_size, micro_batch_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    per_rank = global_batch // world_size
    start = consumed_samples + rank * per_rank
    return list(range(start, start + per_rank))


def micro_batches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    """A rank's indices cut into gradient-accumulation micro-batches, in order."""
    if len(indices) % micro_batch_size:
        raise ValueError(f"{len(indices)} samples do not split into micro-batches of {micro_batch_size}")
    return [indices[i:i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]


# ------------------------------------------------------------------ length and rate


def run_length(training: TrainingConfig, seq_length: int) -> tuple[int, int]:
    """(target steps, tokens those steps hold), walking the batch-size ramp-up.

    With `trainTokens` the run ends at the first step that reaches it.
    """
    steps, samples = 0, 0
    while True:
        if training.train_steps is not None and steps >= training.train_steps:
            break
        if training.train_tokens is not None and samples * seq_length >= training.train_tokens:
            break
        samples += global_batch_size_at(samples, training)
        steps += 1
    return steps, samples * seq_length


def decay_tokens(optim: OptimConfig, run_tokens: int) -> int:
    """Cosine length: the manifest's decayTokens, else the whole run."""
    return optim.decay_tokens if optim.decay_tokens is not None else max(run_tokens, 1)


def learning_rate(tokens: int, optim: OptimConfig, decay_tokens: int) -> float:
    """The rate for a step that brings the run to `tokens` tokens trained on.

    Using the tokens *after* the step means the first step already has a non-zero rate.
    """
    if optim.warmup_tokens and tokens <= optim.warmup_tokens:
        return optim.lr * tokens / optim.warmup_tokens
    # Megatron's definition: decay_tokens counts from token 0, warmup included.
    span = max(decay_tokens - optim.warmup_tokens, 1)
    progress = min(max(tokens - optim.warmup_tokens, 0) / span, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + cosine * (optim.lr - optim.min_lr)


# ------------------------------------------------------------------- skipped data


def skip_past(consumed: int, skipped_ranges: list[list[int]]) -> int:
    """Where the next batch starts: `consumed`, or the end of a skipped range it falls in.

    After a rollback the run replays from the checkpoint and reaches the bad range's start
    at a step boundary (batches depend only on consumed samples), then jumps past it: only
    the recorded range is left out, not the good steps between the checkpoint and it."""
    moved = True
    while moved:
        moved = False
        for start, end in skipped_ranges:
            if start <= consumed < end:
                consumed, moved = end, True
    return consumed


def samples_trained(consumed: int, skipped_ranges: list[list[int]]) -> int:
    """Samples actually trained on once `consumed` samples of the order are behind: the
    skipped ranges do not count (tokens and the learning-rate schedule follow this)."""
    skipped = sum(max(0, min(end, consumed) - start) for start, end in skipped_ranges)
    return consumed - skipped
