"""Goodput accounting (bloomrun/operator/goodput.py): a run's device-hours split by use, from
timelines of what the operator saw and what the trainer reported, with exact buckets."""

from datetime import timedelta

import pytest

from bloomrun.operator.goodput import BUCKETS, account
from bloomrun.operator.reconcile import rfc3339
from bloomrun.operator.spec import BloomRunStatus, Goodput, Progress

from .conftest import make_run
from .test_reconcile import T0, pod, step

A, B = "2026-11-26T12:10:00Z", "2026-11-26T13:40:00Z"  # two trainer sessions' start times


def replay(timeline):
    """(seconds since the previous accounting, devices held, phase, progress) -> Goodput."""
    goodput, now = account(Goodput(), Progress(), devices=0, evaluation_devices=0, phase=None, now=T0), T0
    for seconds, devices, phase, progress, *evaluation in timeline:
        now += timedelta(seconds=seconds)
        goodput = account(goodput, progress, devices=devices, evaluation_devices=(evaluation or [0])[0],
                          phase=phase, now=now)
    return goodput


def test_a_run_with_a_wait_a_checkpoint_a_failure_and_a_resume_gets_exact_buckets():
    goodput = replay([
        # 10 min Pending with one of two 8-GPU workers up: held, waiting for the scheduler.
        (600, 8, "Pending", Progress()),
        # Both up; session A starts and has not stepped yet after 5 min (the first start-up).
        (300, 16, "Running", Progress(start_time=A, resumed_step=0, step=0, step_seconds=0, checkpoint_seconds=0)),
        # An hour: 3000 s of steps to step 1000, a 300 s save (the checkpoint at step 1000), 300 s unexplained.
        (3600, 16, "Running", Progress(start_time=A, resumed_step=0, step=1000, step_seconds=3000, checkpoint_seconds=300)),
        # Ten more minutes of steps, to step 1200; then a worker fails.
        (600, 16, "Running", Progress(start_time=A, resumed_step=0, step=1200, step_seconds=3600, checkpoint_seconds=300)),
        # Two minutes Restarting with one worker left holding its 8 GPUs.
        (120, 8, "Restarting", Progress(start_time=A, resumed_step=0, step=1200, step_seconds=3600, checkpoint_seconds=300)),
        # Session B resumes from the step-1000 checkpoint and starts up for 3 minutes.
        (180, 16, "Running", Progress(start_time=B, resumed_step=1000, step=1000, step_seconds=0, checkpoint_seconds=0)),
        # Ten minutes: 540 s of steps, a 30 s save; one 1-GPU evaluation Job runs throughout.
        (600, 16, "Running", Progress(start_time=B, resumed_step=1000, step=1300, step_seconds=540, checkpoint_seconds=30), 1),
    ])
    expected = {
        "scheduling": 8 * 600 / 3600,
        "other": 16 * 300 / 3600 + 16 * 300 / 3600 + 16 * 30 / 3600,
        # Session A's 1200 steps cost 16 x 3600 s; the 200 after the checkpoint were redone.
        "productive": 16 * 3600 / 3600 * 1000 / 1200 + 16 * 540 / 3600,
        "lost": 16 * 3600 / 3600 * 200 / 1200,
        "checkpoint": 16 * 300 / 3600 + 16 * 30 / 3600,
        "restart": 8 * 120 / 3600 + 16 * 180 / 3600,
        "evaluation": 1 * 600 / 3600,
    }
    for bucket in BUCKETS:
        assert getattr(goodput, bucket) == pytest.approx(expected[bucket], abs=2e-6), bucket
    total = sum(expected.values())
    assert goodput.ratio == pytest.approx(expected["productive"] / total, abs=1e-4)
    assert goodput.display == f"{expected['productive'] / total:.0%}" == "62%"
    # Every device-hour held is in exactly one bucket.
    held = (8 * 600 + 16 * 300 + 16 * 3600 + 16 * 600 + 8 * 120 + 16 * 180 + 16 * 600 + 600) / 3600
    assert sum(getattr(goodput, b) for b in BUCKETS) == pytest.approx(held, abs=1e-5)


def test_a_restart_in_place_that_the_operator_never_saw_is_still_counted_from_the_new_session():
    """torchrun restarted the group itself (the hang watchdog, a worker crash): no Restarting
    phase, but the new session's start and resumed step tell the lost steps and the overhead."""
    goodput = replay([
        (0, 8, "Running", Progress(start_time=A, resumed_step=0, step=0, step_seconds=0)),
        (100, 8, "Running", Progress(start_time=A, resumed_step=0, step=100, step_seconds=100)),
        (60, 8, "Running", Progress(start_time=B, resumed_step=50, step=50, step_seconds=0)),
        (40, 8, "Running", Progress(start_time=B, resumed_step=50, step=80, step_seconds=30)),
    ])
    assert goodput.lost == pytest.approx(8 * 100 / 3600 * 50 / 100, abs=1e-6)
    assert goodput.productive == pytest.approx(8 * 50 / 3600 + 8 * 30 / 3600, abs=1e-6)
    # Between B's start and its first step the time is restart overhead; the 10 s of B's
    # last interval that no step explains are unexplained.
    assert goodput.restart == pytest.approx(8 * 60 / 3600, abs=1e-6)
    assert goodput.other == pytest.approx(8 * 10 / 3600, abs=1e-6)


def test_a_late_report_never_credits_more_than_the_interval_held():
    goodput = replay([
        (0, 4, "Running", Progress(start_time=A, resumed_step=0, step=0, step_seconds=0)),
        # 90 s of steps and 30 s of saving reported after only 60 s of accounting.
        (60, 4, "Running", Progress(start_time=A, resumed_step=0, step=90, step_seconds=90, checkpoint_seconds=30)),
    ])
    assert goodput.productive == pytest.approx(4 * 45 / 3600, abs=1e-6)
    assert goodput.checkpoint == pytest.approx(4 * 15 / 3600, abs=1e-6)
    assert goodput.other == 0 and goodput.ratio == pytest.approx(0.75)


def test_the_planner_accounts_goodput_with_the_nodes_and_phase_since_the_last_reconcile():
    run = make_run(nodes={"min": 2, "max": 2}, gpusPerNode=8)
    _, status = step(run, BloomRunStatus(), [])
    pods = [pod(run, 0), pod(run, 1)]
    _, status = step(run, status, pods, now=T0 + timedelta(seconds=1))
    assert status.phase == "Running" and status.goodput.accounted_at == rfc3339(T0 + timedelta(seconds=1))
    status.progress = Progress(start_time=A, resumed_step=0, step=300, step_seconds=240, checkpoint_seconds=30)
    result, status = step(run, status, pods, now=T0 + timedelta(seconds=301))
    assert status.goodput.productive == pytest.approx(16 * 240 / 3600, abs=1e-6)
    assert status.goodput.checkpoint == pytest.approx(16 * 30 / 3600, abs=1e-6)
    assert status.goodput.other == pytest.approx(16 * 30 / 3600, abs=1e-6)
    assert status.goodput.display == "80%"
    # Goodput alone does not make the operator write status more than once a minute.
    result, _ = step(run, status, pods, now=T0 + timedelta(seconds=311))
    assert not result.status_changed


def test_the_planner_counts_the_evaluation_jobs_that_ran_since_the_last_reconcile():
    from bloomrun.operator.spec import Evaluation

    run = make_run(nodes={"min": 1, "max": 1}, gpusPerNode=8, eval={"tasks": ["bloomrun_stories_order"], "gpus": 2})
    status = BloomRunStatus(phase="Running", evaluation=Evaluation(running=[1000, 2000]))
    status.goodput = Goodput(accounted_at=rfc3339(T0))
    _, status = step(run, status, [pod(run, 0)], now=T0 + timedelta(seconds=600))
    assert status.goodput.evaluation == pytest.approx(2 * 2 * 600 / 3600, abs=1e-6)


def test_goodput_reaches_the_operators_metrics_and_leaves_with_the_run():
    from prometheus_client import CollectorRegistry

    from bloomrun.operator.metrics import OperatorMetrics

    metrics = OperatorMetrics(CollectorRegistry())
    metrics.observe_run("team", "r1", BloomRunStatus(goodput=Goodput(productive=3.0, lost=1.0, ratio=0.75)), None)
    value = metrics.registry.get_sample_value
    labels = {"namespace": "team", "run": "r1"}
    assert value("bloomrun_run_goodput_ratio", labels) == 0.75
    assert value("bloomrun_run_goodput_gpu_seconds", {**labels, "use": "productive"}) == 3 * 3600
    assert value("bloomrun_run_goodput_gpu_seconds", {**labels, "use": "lost"}) == 3600
    assert value("bloomrun_run_goodput_gpu_seconds", {**labels, "use": "restart"}) == 0
    metrics.forget_run("team", "r1")
    assert value("bloomrun_run_goodput_ratio", labels) is None
    assert value("bloomrun_run_goodput_gpu_seconds", {**labels, "use": "lost"}) is None
