"""Learning-rate schedule and run length: pure functions of tokens and samples.

The paper's schedule (PAPER.md): linear warmup over `warmupTokens`, then cosine decay to
`minLr`, measured in tokens rather than steps, as Megatron-DeepSpeed's `--lr-decay-tokens`
does. Counting tokens keeps the schedule unchanged when the batch-size ramp-up changes how
many tokens a step holds, and makes the rate a function of `consumed_samples` alone, which
the checkpoint stores: a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from typing import Callable

from bloomrun.trainer.config import OptimConfig, TrainingConfig


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


def run_length(
    training: TrainingConfig,
    seq_length: int,
    batch_size_at: Callable[[int, TrainingConfig], int],
) -> tuple[int, int]:
    """(target steps, tokens those steps hold), walking the batch-size ramp-up.

    `batch_size_at(consumed_samples, training)` is the data module's ramp-up rule; with
    `trainTokens` the run ends at the first step that reaches it.
    """
    steps, samples = 0, 0
    while True:
        if training.train_steps is not None and steps >= training.train_steps:
            break
        if training.train_tokens is not None and samples * seq_length >= training.train_tokens:
            break
        samples += batch_size_at(samples, training)
        steps += 1
    return steps, samples * seq_length


def decay_tokens(optim: OptimConfig, run_tokens: int) -> int:
    """Cosine length: the manifest's decayTokens, else the whole run."""
    return optim.decay_tokens if optim.decay_tokens is not None else max(run_tokens, 1)
