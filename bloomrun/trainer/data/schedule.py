"""Which samples each step and each rank trains on: pure functions of `consumed_samples`.

The checkpoint stores consumed_samples (the number of global samples every earlier step
used). Step k trains on the global indices [consumed, consumed + global_batch), whatever
the number of ranks, so a run killed and resumed, on the same or another world size,
trains on exactly the samples an uninterrupted run would have: the union over ranks of
each step's indices is the same set. Rank r takes the r-th contiguous slice of it and
cuts that into micro-batches in order.
"""

from __future__ import annotations

import math

from ..config import TrainingConfig


def global_batch_size_at(consumed_samples: int, training_cfg: TrainingConfig) -> int:
    """The global batch of the step that starts after `consumed_samples` samples.

    Megatron's --rampup-batch-size START INCREMENT SAMPLES: the batch grows from START by
    INCREMENT in equal stages spread over the first SAMPLES samples, then stays at
    globalBatchSize (BLOOM: 32 -> 2048 over the first ~20M samples).
    """
    target = training_cfg.global_batch_size
    ramp = training_cfg.rampup
    if ramp is None or consumed_samples >= ramp.samples:
        return target
    span = target - ramp.start
    if span % ramp.increment:
        raise ValueError(f"training.rampup: globalBatchSize - start ({span}) must be a multiple "
                         f"of increment ({ramp.increment})")
    num_increments = span // ramp.increment
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


def consumed_samples_after(steps: int, training_cfg: TrainingConfig) -> int:
    """Samples consumed by the first `steps` optimiser steps (ramp-up included)."""
    consumed = 0
    for _ in range(steps):
        consumed += global_batch_size_at(consumed, training_cfg)
    return consumed


def steps_for_tokens(train_tokens: int, seq_length: int, training_cfg: TrainingConfig) -> int:
    """Optimiser steps until at least `train_tokens` tokens (seq_length per sample) are seen."""
    samples = math.ceil(train_tokens / seq_length)
    steps, consumed = 0, 0
    while consumed < samples:
        consumed += global_batch_size_at(consumed, training_cfg)
        steps += 1
    return steps
