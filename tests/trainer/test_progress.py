"""The trainer's progress reporter against a local HTTP server standing in for the API."""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from bloomrun.trainer.progress import HeldSteps, NullReporter, ProgressReporter, held_steps_of


def send_json(handler: BaseHTTPRequestHandler, status: int, body) -> None:
    """Answers the stand-in API server's request with `body` as JSON."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def serve(handler: type[BaseHTTPRequestHandler]) -> HTTPServer:
    """A stand-in API server on a free local port, answering from a thread until shutdown()."""
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def fake_api():
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], self.headers["Authorization"], json.loads(body)))
            status, reply = 200, {}
            if "forbidden" in self.path:
                status = 403
            elif "flaky" in self.path and len(received) == 1:
                status = 500
            elif "reborn" in self.path:  # what the API server says when the uid test fails
                status, reply = 422, {"kind": "Status", "status": "Failure", "code": 422, "reason": "Invalid",
                                      "message": "the server rejected our request due to an error in our request"}
            elif "evaluated" in self.path:  # the patched run, as the API server replies
                reply = {"metadata": {"uid": "uid-1"}, "spec": {"eval": {"tasks": ["copa"]}},
                         "status": {"progress": {"checkpointStep": 600},
                                    "evaluation": {"seenStep": 500, "running": [300], "queued": [400, 500]}}}
            send_json(self, status, reply)

        def do_GET(self):  # the run of this name: another one than uid-1's once "reborn"
            send_json(self, 200, {"metadata": {"uid": "uid-2" if "reborn" in self.path else "uid-1"}})

        def log_message(self, *args):
            pass

    server = serve(Handler)
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()


def env_for(url, tmp_path, **extra):
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    return {"BLOOMRUN_RUN_NAME": "ablation", "BLOOMRUN_RUN_NAMESPACE": "team-a", "BLOOMRUN_RUN_UID": "uid-1",
            "BLOOMRUN_API_URL": url, "BLOOMRUN_TOKEN_FILE": str(token), "BLOOMRUN_CA_FILE": str(tmp_path / "none"),
            **extra}


def progress_of(patch: list[dict], uid: str = "uid-1") -> dict:
    """The fields a JSON patch adds under /status/progress, after its uid test."""
    assert patch[0] == {"op": "test", "path": "/metadata/uid", "value": uid}, patch[0]
    prefix = "/status/progress/"
    assert all(op["op"] == "add" and op["path"].startswith(prefix) for op in patch[1:]), patch
    return {op["path"][len(prefix):]: op["value"] for op in patch[1:]}


def test_outside_a_cluster_reporting_is_a_no_op():
    assert isinstance(ProgressReporter.from_env({}), NullReporter)
    ProgressReporter.from_env({}).report(1, 10, 100, 2.0, 5.0)


def test_only_rank_zero_reports(tmp_path, fake_api):
    url, _ = fake_api
    assert isinstance(ProgressReporter.from_env(env_for(url, tmp_path, RANK="3")), NullReporter)
    assert isinstance(ProgressReporter.from_env(env_for(url, tmp_path, RANK="0")), ProgressReporter)


def test_patches_its_own_runs_status_with_a_json_patch_that_tests_the_uid(tmp_path, fake_api):
    url, received = fake_api
    reporter = ProgressReporter.from_env(env_for(url, tmp_path))
    reporter.report(5, 100, 5000, 3.25, 1234.5, checkpoint_step=4, checkpoint_time=0.0, checkpoint_tokens=4000,
                    force=True)
    reporter.close()
    path, content_type, auth, body = received[-1]
    assert path == "/apis/bloomrun.io/v1alpha1/namespaces/team-a/bloomruns/ablation/status"
    assert content_type == "application/json-patch+json"
    assert auth == "Bearer secret-token"
    progress = progress_of(body)
    assert progress["step"] == 5 and progress["targetSteps"] == 100 and progress["tokens"] == 5000
    assert progress["loss"] == 3.25 and progress["tokensPerSecond"] == 1234.5
    assert progress["checkpointStep"] == 4 and progress["checkpointTime"] == "1970-01-01T00:00:00Z"
    assert progress["checkpointTokens"] == 4000  # evaluation is scheduled by it


def test_rate_limited_but_the_last_report_is_flushed(tmp_path, fake_api):
    url, received = fake_api
    reporter = ProgressReporter.from_env(env_for(url, tmp_path, BLOOMRUN_PROGRESS_INTERVAL="30"))
    reporter.report(1, 100, 10, 5.0, 1.0, checkpoint_step=1, checkpoint_time="2026-01-01T00:00:00Z",
                    checkpoint_tokens=10)
    for step in range(2, 50):
        reporter.report(step, 100, step * 10, math.nan, 1.0)
    reporter.close()
    steps = [progress_of(r[3])["step"] for r in received]
    assert steps[-1] == 49 and len(steps) <= 2  # the first report goes at once, the rest coalesce
    last = progress_of(received[-1][3])
    assert last["loss"] is None  # NaN is not JSON: reported as absent
    assert last["checkpointStep"] == 1  # an unsent checkpoint report is not lost by merging
    assert last["checkpointTokens"] == 10


def test_without_the_runs_uid_nothing_is_reported(tmp_path, fake_api):
    url, _ = fake_api
    env = env_for(url, tmp_path)
    del env["BLOOMRUN_RUN_UID"]
    assert isinstance(ProgressReporter.from_env(env), NullReporter)


def test_a_reporter_whose_run_was_replaced_stops_and_a_failed_send_is_sent_again(tmp_path, fake_api):
    url, received = fake_api
    stale = ProgressReporter.from_env(env_for(url, tmp_path, BLOOMRUN_RUN_NAME="reborn"))
    stale.report(1, 10, 100, 2.0, 1.0, force=True)
    wait_until(lambda: stale.superseded, 5)
    stale.report(2, 10, 200, 2.0, 1.0, force=True)
    stale.close()
    assert len(received) == 1 and stale.sent == 0  # nothing more once the uid test failed
    received.clear()
    flaky = ProgressReporter.from_env(env_for(url, tmp_path, BLOOMRUN_RUN_NAME="flaky", BLOOMRUN_PROGRESS_INTERVAL="0.2"))
    flaky.report(3, 10, 300, 2.0, 1.0, checkpoint_step=3, checkpoint_time=0.0, checkpoint_tokens=300, force=True)
    wait_until(lambda: len(received) == 1, 5)  # refused with a 500
    flaky.report(4, 10, 400, 1.5, 1.0, force=True)
    flaky.close()
    last = progress_of(received[-1][3])
    assert (last["step"], last["checkpointStep"], last["checkpointTokens"]) == (4, 3, 300) and flaky.sent == 1


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_api_errors_never_reach_the_training_loop(tmp_path, fake_api, caplog):
    url, _ = fake_api
    env = env_for(url, tmp_path, BLOOMRUN_RUN_NAMESPACE="forbidden")
    reporter = ProgressReporter.from_env(env)
    reporter.report(1, 2, 3, 1.0, 1.0, force=True)
    reporter.close()
    assert reporter.sent == 0 and "403" in caplog.text
    unreachable = ProgressReporter.from_env(env_for("http://127.0.0.1:1", tmp_path))
    unreachable.report(1, 2, 3, 1.0, 1.0, force=True)
    unreachable.close()
    assert unreachable.sent == 0


def test_the_sessions_timing_reaches_status_and_the_operators_accounting_reads_it(tmp_path, fake_api):
    """What goodput is computed from (bloomrun/operator/goodput.py): this session's start, the
    step it resumed from, its seconds in steps and in saves; a step report without timing
    keeps the pending one's."""
    from bloomrun.operator.spec import Progress
    from bloomrun.trainer.progress import Timing

    url, received = fake_api
    reporter = ProgressReporter.from_env(env_for(url, tmp_path, BLOOMRUN_PROGRESS_INTERVAL="3600"))
    reporter.report(30, 100, 3000, None, None, timing=Timing(1796000000.0, 30, 0.0, 0.0), force=True)
    reporter.report(41, 100, 4100, 2.5, 900.0, timing=Timing(1796000000.0, 30, 12.3456, 4.0))
    reporter.report(42, 100, 4200, 2.4, 910.0)
    reporter.close()
    first, last = progress_of(received[0][3]), progress_of(received[-1][3])
    assert (first["startTime"], first["resumedStep"]) == ("2026-11-30T00:53:20Z", 30)  # maybe merged with later
    assert last["step"] == 42 and last["stepSeconds"] == 12.346 and last["checkpointSeconds"] == 4.0
    parsed = Progress.model_validate(last)
    assert (parsed.start_time, parsed.resumed_step, parsed.step_seconds) == ("2026-11-30T00:53:20Z", 30, 12.346)


def test_held_steps_are_the_pending_evaluations_and_what_the_operator_has_not_decided_about():
    spec = {"eval": {"suite": "bigscience-27"}}
    status = {"progress": {"step": 650, "checkpointStep": 600},
              "evaluation": {"seenStep": 500, "running": [300], "queued": [400, 500]}}
    held = held_steps_of({"spec": spec, "status": status})
    assert held == HeldSteps(frozenset({300, 400, 500}), from_step=600)
    assert [s for s in range(100, 900, 100) if s in held] == [300, 400, 500, 600, 700, 800]
    # The operator has looked at 600 (not due): it is no longer held, newer ones are.
    decided = {**status, "evaluation": {**status["evaluation"], "seenStep": 600}}
    assert held_steps_of({"spec": spec, "status": decided}).from_step == 601
    # A status the operator has not written yet: every step may still be due.
    assert held_steps_of({"spec": spec}) == HeldSteps(frozenset(), from_step=0)
    assert held_steps_of({"spec": spec, "status": {"evaluation": {"seenStep": 200}}}).from_step == 201
    # Without spec.eval (the workers' config never has it) nothing is held.
    for run in ({"spec": {}, "status": status}, {"spec": {"eval": None}, "status": status}, {}):
        assert [s for s in range(0, 1000, 100) if s in held_steps_of(run)] == []
    assert 300 not in NullReporter().held_steps()  # no API server: a local study scores synchronously


def test_the_reporter_holds_every_step_until_it_reads_the_run_then_what_the_reply_says(tmp_path, fake_api):
    url, _ = fake_api
    reporter = ProgressReporter.from_env(env_for(url, tmp_path, BLOOMRUN_RUN_NAME="evaluated"))
    assert 100 in reporter.held_steps() and 10**9 in reporter.held_steps()  # nothing read yet
    reporter.report(650, 1000, 65_000, 2.0, 1.0, force=True)
    reporter.close()
    assert reporter.sent == 1
    assert reporter.held_steps() == HeldSteps(frozenset({300, 400, 500}), from_step=600)
    plain = ProgressReporter.from_env(env_for(url, tmp_path))  # a reply that is not the run: no view
    plain.report(1, 10, 10, 2.0, 1.0, force=True)
    plain.close()
    assert plain.sent == 1 and 300 in plain.held_steps()


@pytest.mark.cluster
def test_a_checkpoint_whose_evaluation_is_pending_survives_pruning_on_the_real_api_server(cluster, tmp_path):
    """The whole loop with the real operator: the trainer's reporter (its own ServiceAccount)
    reports checkpoints 100..600, the operator decides which are due (everyCheckpoints 3: 300
    and 600; maxConcurrent 1: 300's Job runs, 600 waits), and pruning with keepLast 1 keeps
    exactly those two, each one from its publication on, before the operator had looked."""
    import torch
    import yaml

    from bloomrun.trainer import checkpoint as ckpt
    from bloomrun.trainer.checkpoint import TrainState
    from tests.operator.e2e import Operator, Runs, install_crds
    from tests.operator.e2e import wait_for as wait_cluster

    install_crds(cluster)
    # The namespace before the operator: its first listing finds it (once in five runs, an
    # operator started first never picked up a namespace created during its start).
    namespace = cluster.new_namespace("br-hold", pod_security="restricted")
    cluster.create_pvc(namespace, "checkpoints")
    runs = Runs(cluster, namespace)
    operator = Operator(cluster, "--standalone", "--namespace", "br-hold-*")
    try:
        runs.create(runs.manifest("held", runs.add_nodes(2), 1, 1, checkpointVolume={"claimName": "checkpoints"},
                                  eval={"tasks": ["bloomrun_stories_order"], "everyCheckpoints": 3}))
        runs.wait_phase("held", "Running", timeout=120)
        token = tmp_path / "token"
        kubeconfig = yaml.safe_load(open(cluster.token_kubeconfig(namespace, "held-trainer")))  # the trainer's own
        token.write_text(kubeconfig["users"][0]["user"]["token"])
        reporter = ProgressReporter.from_env({
            "BLOOMRUN_RUN_NAME": "held", "BLOOMRUN_RUN_NAMESPACE": namespace,
            "BLOOMRUN_RUN_UID": runs.get("held")["metadata"]["uid"], "BLOOMRUN_API_URL": cluster.server,
            "BLOOMRUN_TOKEN_FILE": str(token), "BLOOMRUN_CA_FILE": str(cluster.layout.pki.ca),
            "BLOOMRUN_PROGRESS_INTERVAL": "0.2"})
        root = tmp_path / "checkpoints"

        def on_disk() -> list[int]:
            return sorted(step for step, _path in ckpt.list_checkpoints(root))

        # On disk after each publication and prune: 300 stays once its Job runs, older than keepLast.
        expected = {100: [100], 200: [200], 300: [300], 400: [300, 400], 500: [300, 500], 600: [300, 600]}
        for step in range(100, 700, 100):
            ckpt.publish(root, TrainState(step=step, tokens=step * 1000), {"w": torch.ones(2)}, {}, {})
            ckpt.prune(root, keep_last=1, held=reporter.held_steps())  # as ckpt.save does on rank 0
            assert on_disk() == expected[step], step
            reporter.report(step, 1000, step * 1000, 2.0, 1.0, checkpoint_step=step, checkpoint_time=time.time(),
                            checkpoint_tokens=step * 1000, force=True)
            evaluation = lambda: runs.status("held").get("evaluation") or {}  # noqa: E731
            wait_cluster(lambda: evaluation().get("seenStep") == step, 60, f"the operator to look at {step}")
            # The reporter learns the operator's decision from the reply to its next report.
            reporter.report(step + 1, 1000, step * 1000, 2.0, 1.0, force=True)
            wait_cluster(lambda: reporter.held_steps().from_step == step + 1, 60, f"a reply after {step}")
        reporter.close()
        evaluation = runs.status("held")["evaluation"]
        assert (evaluation["running"], evaluation.get("queued")) == ([300], [600]), evaluation
        ckpt.prune(root, keep_last=1, held=reporter.held_steps())
        assert on_disk() == [300, 600]
        ckpt.prune(root, keep_last=1, held=NullReporter().held_steps())
        assert on_disk() == [600], "without the run's status the same folder is pruned to keepLast"
    finally:
        operator.stop()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
        runs.cleanup()


@pytest.fixture
def evaluating_api():
    """An API server standing in for a run with spec.eval whose operator decides at once:
    every reported checkpoint is seen, and only step 2's evaluation is due (it runs)."""
    progress: dict = {}

    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self):
            patch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            progress.update({op["path"].rsplit("/", 1)[1]: op["value"] for op in patch[1:]})
            run = {"metadata": {"uid": "uid-1"}, "spec": {"eval": {"tasks": ["copa"]}},
                   "status": {"progress": dict(progress),
                              "evaluation": {"seenStep": progress.get("checkpointStep"), "running": [2]}}}
            send_json(self, 200, run)

        def log_message(self, *args):
            pass

    server = serve(Handler)
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.mark.slow
def test_the_trainer_keeps_a_checkpoint_its_run_says_is_being_evaluated(tmp_path, evaluating_api):
    """The real trainer (torchrun, one CPU rank) as rank 0 of a pod: keepLast 1, a checkpoint
    every 2 steps for 12 steps. Step 2, whose evaluation runs, survives; the others are
    pruned once the operator has seen them. The same run without an API server keeps
    keepLast only."""
    from bloomrun.trainer.checkpoint_layout import list_checkpoints
    from tests.trainer.data_helpers import write_corpus
    from tests.trainer.trainer_runs import Run, config

    corpus = write_corpus(tmp_path / "corpus" / "corpus")
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    env = {"BLOOMRUN_RUN_NAMESPACE": "team-a", "BLOOMRUN_RUN_UID": "uid-1", "BLOOMRUN_API_URL": evaluating_api,
           "BLOOMRUN_TOKEN_FILE": str(token), "BLOOMRUN_CA_FILE": str(tmp_path / "none")}
    kept = {}
    for name, extra in (("pod", env), ("local", {})):
        cfg = config(corpus, tmp_path / name / "checkpoints", steps=12, every=2)
        cfg["checkpoint"]["keepLast"] = 1
        run = Run(tmp_path / name, cfg, ranks=1, env=extra).run()
        kept[name] = sorted(step for step, _path in list_checkpoints(tmp_path / name / "checkpoints"))
        if name == "pod":
            assert "for evaluation (pending, or not decided yet): steps [2" in run.output()
    assert kept["pod"][0] == 2 and kept["pod"][-1] == 12, kept
    assert 4 not in kept["pod"], kept  # seen by the operator, not due: pruned
    assert kept["local"] == [12]
