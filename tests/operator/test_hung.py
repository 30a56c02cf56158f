"""A pod whose trainer watchdog found a hung rank: classified `Hung`, replaced under the
run's hang policy (its own backoff and limit), whatever torchrun's exit code was."""

from datetime import timedelta

from bloomrun.operator.reconcile import HUNG, RETRYABLE_EXIT, classify
from bloomrun.operator.spec import BloomRunStatus
from bloomrun.trainer.train import HUNG_MARK

from .conftest import make_run
from .test_reconcile import T0, pod, step

# What bloomrun.trainer.watchdog writes as the container's termination message.
HUNG_MESSAGE = (HUNG_MARK + "rank 1 (pid 4242) on node gpu-7 made no progress for 612.0 s in step 1201 "
                "(timeout 600.0 s = max(10 x median step 0.287 s, floor 600 s)): process stopped")


def test_the_watchdogs_message_makes_a_failed_pod_hung_whatever_the_exit_code():
    run = make_run()
    codes = run.spec.restart_policy.retryable_exit_codes
    for code in (1, 143, 137, 2):  # torchrun's own exit, its SIGTERM, a kill, anything
        hung = pod(run, 0, "Failed", exit_code=code, message=HUNG_MESSAGE)
        assert classify(hung, None, codes) == HUNG
    # The same exit without the message is torchrun giving up for another reason.
    assert classify(pod(run, 0, "Failed", exit_code=1, message="worker failed"), None, codes) == RETRYABLE_EXIT
    # A pod still running is not failed, whatever its (stale) message.
    assert classify(pod(run, 0, "Running", message=HUNG_MESSAGE), None, codes) is None


def test_a_hung_pod_is_replaced_after_the_hang_backoff_which_doubles_per_hang():
    run = make_run(restartPolicy={"backoffSeconds": 4, "maxRestarts": 10,
                                  "hang": {"backoffSeconds": 30, "maxRestarts": 5}})
    status = BloomRunStatus(phase="Running")
    delays = []
    for n in range(3):
        result, status = step(run, status, [pod(run, 0, "Failed", exit_code=143, uid=f"h{n}", message=HUNG_MESSAGE)])
        delays.append(result.requeue_after)
        assert result.restart_reasons == [HUNG] and [d.uid for d in result.deletes] == [f"h{n}"]
    assert delays == [30, 60, 120]
    assert status.restarts == 3 and status.restarts_by_reason == {HUNG: 3}
    assert status.last_failure.reason == HUNG and "rank 1" in status.last_failure.message
    assert status.phase == "Restarting" and "Hung" in status.message
    # Another kind of failure keeps the general backoff: 4 x 2^(4 restarts - 1) = 32 s.
    result, status = step(run, status, [pod(run, 0, "Failed", exit_code=137, uid="other")])
    assert result.requeue_after == 32 and status.restarts_by_reason == {HUNG: 3, RETRYABLE_EXIT: 1}


def test_hangs_past_their_own_limit_fail_the_run_before_max_restarts():
    run = make_run(restartPolicy={"maxRestarts": 10, "backoffSeconds": 0, "hang": {"maxRestarts": 1, "backoffSeconds": 0}})
    result, status = step(run, BloomRunStatus(phase="Running"),
                          [pod(run, 0, "Failed", exit_code=1, uid="a", message=HUNG_MESSAGE)])
    assert status.phase == "Restarting" and status.restarts_by_reason == {HUNG: 1}
    result, status = step(run, status, [pod(run, 0, "Failed", exit_code=1, uid="b", message=HUNG_MESSAGE)],
                          now=T0 + timedelta(seconds=1))
    assert status.phase == "Failed" and status.restarts == 2
    failed = next(c for c in status.conditions if c.type == "Failed")
    assert failed.status == "True" and failed.reason == "HangLimitExceeded"
    assert "restartPolicy.hang.maxRestarts 1" in status.message
