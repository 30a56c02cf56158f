"""Goodput: where a run's GPU-hours went. Pure: one accounting step per reconcile.

The operator knows what it holds and for how long (ready workers x GPUs, as in gpuHours; a
CPU worker counts as one device here so CPU runs get a goodput too) and in which phase; the
trainer reports, in status.progress, its session (`startTime`, `resumedStep`) and the wall
seconds it spent in steps and in checkpoint saves since that start (progress.Timing). Each
reconcile splits the device-hours held since the last accounting:

- the trainer's new step seconds x devices: *productive*; its new save seconds: *checkpoint*;
- the rest of the interval: *scheduling* while the run was Pending (workers held while
  others wait for the scheduler), *restart* while it was Restarting or while a session that
  followed another has not stepped yet (backoff, replacement, start-up, resume: "from the
  failure to the first step again"), else *other* (the first start-up, unreported time);
- a new session (another `startTime`) is a restart: the steps between the checkpoint it
  resumed from and the last step the previous session reported were done twice, so their
  share of that session's productive hours moves to *lost*;
- evaluation Jobs running x their devices: *evaluation*.

Reports arrive every ~10 s and reconciles at least every 10 s, so the split is exact up to
one report interval at each boundary; the tests replay timelines with exact buckets.
"""

from __future__ import annotations

from datetime import datetime

from bloomrun.operator.spec import Goodput, GoodputSession, Progress

BUCKETS = ("productive", "lost", "restart", "checkpoint", "evaluation", "scheduling", "other")
DIGITS = 6  # as gpuHours: a millionth of a GPU-hour is 3.6 GPU-milliseconds


def account(goodput: Goodput, progress: Progress, *, devices: float, phase: str | None, now: datetime,
            evaluation_devices: float = 0.0) -> Goodput:
    """The accounting after the interval since `goodput.accountedAt`, during which `devices`
    were held by the workers, `evaluation_devices` by evaluation Jobs and the run was in
    `phase` (all three as they were since the last accounting)."""
    from bloomrun.operator.reconcile import parse_time  # reconcile imports this module

    new = goodput.model_copy(deep=True)
    session = _follow_session(new, progress)
    since = parse_time(goodput.accounted_at)
    if since is not None and now > since:
        seconds = (now - since).total_seconds()
        step_s = max((progress.step_seconds or 0.0) - session.step_seconds, 0.0)
        checkpoint_s = max((progress.checkpoint_seconds or 0.0) - session.checkpoint_seconds, 0.0)
        busy = step_s + checkpoint_s
        scale = min(1.0, seconds / busy) if busy else 1.0  # a late report never outgrows the interval
        productive = devices * step_s * scale / 3600
        new.productive += productive
        session.productive += productive
        new.checkpoint += devices * checkpoint_s * scale / 3600
        rest = devices * max(seconds - busy * scale, 0.0) / 3600
        bucket = _idle_bucket(phase, progress, session)
        setattr(new, bucket, getattr(new, bucket) + rest)
        new.evaluation += evaluation_devices * seconds / 3600
    if progress.start_time == session.start_time:
        session.step_seconds = progress.step_seconds or 0.0
        session.checkpoint_seconds = progress.checkpoint_seconds or 0.0
        session.step = progress.step
    new.session = session
    new.accounted_at = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return _summarise(new)


def _follow_session(goodput: Goodput, progress: Progress) -> GoodputSession:
    """The session to account against; a new one moves the redone steps' hours to lost."""
    old = goodput.session
    if not progress.start_time or progress.start_time == old.start_time:
        return old.model_copy()
    if old.start_time is not None:
        goodput_lost = lost_hours(old, progress.resumed_step or 0)
        goodput_lost = min(goodput_lost, goodput.productive)
        goodput.productive -= goodput_lost
        goodput.lost += goodput_lost
    return GoodputSession(start_time=progress.start_time, resumed_step=progress.resumed_step,
                          step=progress.resumed_step, restarted=old.start_time is not None)


def lost_hours(session: GoodputSession, resumed_step: int) -> float:
    """The productive hours of `session`'s steps after `resumed_step`, at its mean step cost."""
    done = (session.step or 0) - (session.resumed_step or 0)
    redone = (session.step or 0) - resumed_step
    if done <= 0 or redone <= 0:
        return 0.0
    return session.productive * min(redone, done) / done


def _idle_bucket(phase: str | None, progress: Progress, session: GoodputSession) -> str:
    """Where held time that no step or save explains goes."""
    if phase == "Pending":
        return "scheduling"
    stepped = progress.start_time == session.start_time and (progress.step or 0) > (session.resumed_step or 0)
    if phase == "Restarting" or (session.restarted and not stepped):
        return "restart"
    return "other"


def _summarise(goodput: Goodput) -> Goodput:
    for bucket in BUCKETS:
        setattr(goodput, bucket, round(getattr(goodput, bucket), DIGITS))
    goodput.session.productive = round(goodput.session.productive, DIGITS)
    total = sum(getattr(goodput, bucket) for bucket in BUCKETS)
    goodput.ratio = round(goodput.productive / total, 4) if total > 0 else None
    goodput.display = f"{goodput.ratio:.0%}" if goodput.ratio is not None else ""
    return goodput
