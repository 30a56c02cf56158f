"""Faults a test can inject into a real run, through hooks the training loop calls at fixed
points. `FaultHooks()` does nothing (what production runs); train.py reads the hooks a test
asked for from the environment, once, and hands them to the Trainer.

    BLOOMRUN_POISON_SAMPLES=A:B      a micro-batch holding a global sample index in [A, B) gets
                                     a NaN loss, as corrupt data would; drives the rollback tests
    BLOOMRUN_TRACE_FILE=PATH         each rank appends one JSON line per step to PATH.rank<R>:
                                     step, sample indices, loss, lr, whether the update applied
    BLOOMRUN_TEST_HANG_AFTER_STEP=K  every rank sleeps after step K (and its checkpoint), so a
                                     test can kill the run at a known point
    BLOOMRUN_TEST_SLOW_SAVE_S=S      rank 0 sleeps S seconds at the start of every checkpoint save,
                                     as slow storage would (the watchdog must not call it a hang)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

POISON_ENV = "BLOOMRUN_POISON_SAMPLES"
TRACE_ENV = "BLOOMRUN_TRACE_FILE"
HANG_ENV = "BLOOMRUN_TEST_HANG_AFTER_STEP"
SLOW_SAVE_ENV = "BLOOMRUN_TEST_SLOW_SAVE_S"


def parse_poison(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    start, _, end = value.partition(":")
    try:
        return int(start), int(end)
    except ValueError:
        raise ValueError(f"{POISON_ENV}={value!r}: expected START:END sample indices") from None


@dataclass(frozen=True)
class FaultHooks:
    poison: tuple[int, int] | None = None  # [start, end) global sample indices
    trace_file: str | None = None
    hang_after_step: int | None = None
    slow_save_s: float = 0.0

    @classmethod
    def from_env(cls, env=os.environ) -> "FaultHooks":
        hang = env.get(HANG_ENV)
        return cls(poison=parse_poison(env.get(POISON_ENV)), trace_file=env.get(TRACE_ENV) or None,
                   hang_after_step=int(hang) if hang else None, slow_save_s=float(env.get(SLOW_SAVE_ENV) or 0))

    def poisoned_loss(self, loss: torch.Tensor, samples: list[int]) -> torch.Tensor:
        """The micro-batch's loss; NaN when it holds a poisoned sample."""
        if self.poison is not None and any(self.poison[0] <= i < self.poison[1] for i in samples):
            return loss * float("nan")
        return loss

    def record(self, result, rank: int, world_size: int) -> None:
        """Append the step (a trainer.StepResult) to this rank's trace file."""
        if self.trace_file is None:
            return
        entry = {"step": result.step, "rank": rank, "world_size": world_size, "indices": result.sample_indices,
                 "loss": result.loss, "lr": result.lr, "applied": result.applied}
        with open(f"{self.trace_file}.rank{rank}", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def pause_after(self, step: int) -> None:
        """Park this rank for an hour after the step the test named."""
        if self.hang_after_step == step:
            time.sleep(3600)

    def slow_save(self, rank: int) -> None:
        """Rank 0 takes this long more over each save (the others wait in its collectives)."""
        if self.slow_save_s and rank == 0:
            time.sleep(self.slow_save_s)
