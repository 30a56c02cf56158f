"""The trainer's progress reporter against a local HTTP server standing in for the API."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from bloomrun.trainer.progress import NullReporter, ProgressReporter


@pytest.fixture
def fake_api():
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], self.headers["Authorization"], json.loads(body)))
            status = 403 if "forbidden" in self.path else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()


def env_for(url, tmp_path, **extra):
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    return {"BLOOMRUN_RUN_NAME": "ablation", "BLOOMRUN_RUN_NAMESPACE": "team-a", "BLOOMRUN_API_URL": url,
            "BLOOMRUN_TOKEN_FILE": str(token), "BLOOMRUN_CA_FILE": str(tmp_path / "none"), **extra}


def test_outside_a_cluster_reporting_is_a_no_op():
    assert isinstance(ProgressReporter.from_env({}), NullReporter)
    ProgressReporter.from_env({}).report(1, 10, 100, 2.0, 5.0)


def test_only_rank_zero_reports(tmp_path, fake_api):
    url, _ = fake_api
    assert isinstance(ProgressReporter.from_env(env_for(url, tmp_path, RANK="3")), NullReporter)
    assert isinstance(ProgressReporter.from_env(env_for(url, tmp_path, RANK="0")), ProgressReporter)


def test_patches_its_own_status_with_a_merge_patch(tmp_path, fake_api):
    url, received = fake_api
    reporter = ProgressReporter.from_env(env_for(url, tmp_path))
    reporter.report(5, 100, 5000, 3.25, 1234.5, checkpoint_step=4, checkpoint_time=0.0, force=True)
    reporter.close()
    path, content_type, auth, body = received[-1]
    assert path == "/apis/bloomrun.io/v1alpha1/namespaces/team-a/bloomruns/ablation/status"
    assert content_type == "application/merge-patch+json"
    assert auth == "Bearer secret-token"
    progress = body["status"]["progress"]
    assert progress["step"] == 5 and progress["targetSteps"] == 100 and progress["tokens"] == 5000
    assert progress["loss"] == 3.25 and progress["tokensPerSecond"] == 1234.5
    assert progress["checkpointStep"] == 4 and progress["checkpointTime"] == "1970-01-01T00:00:00Z"


def test_rate_limited_but_the_last_report_is_flushed(tmp_path, fake_api):
    url, received = fake_api
    reporter = ProgressReporter.from_env(env_for(url, tmp_path, BLOOMRUN_PROGRESS_INTERVAL="30"))
    reporter.report(1, 100, 10, 5.0, 1.0, checkpoint_step=1, checkpoint_time="2026-01-01T00:00:00Z")
    for step in range(2, 50):
        reporter.report(step, 100, step * 10, math.nan, 1.0)
    reporter.close()
    steps = [r[3]["status"]["progress"]["step"] for r in received]
    assert steps[-1] == 49 and len(steps) <= 2  # the first report goes at once, the rest coalesce
    last = received[-1][3]["status"]["progress"]
    assert last["loss"] is None  # NaN is not JSON: reported as absent
    assert last["checkpointStep"] == 1  # an unsent checkpoint report is not lost by merging


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
