"""pytest plugin: the session-scoped `cluster` fixture (listed in tests/conftest.py).

The cluster starts on first use only, so test runs that need none pay nothing. After a
failing session its logs stay on disk (the path is printed); otherwise its folder is
deleted. BLOOMRUN_KEEP_CLUSTER=1 keeps all of it, etcd's data included.
"""

import os
import sys

import pytest

from tests.cluster.control_plane import Cluster, start_cluster


@pytest.fixture(scope="session")
def cluster(request) -> Cluster:
    running = start_cluster()
    print(f"\ntest cluster up in {running.start_seconds:.1f} s at {running.server} "
          f"(state in {running.layout.root})", file=sys.stderr)
    yield running
    keep_state = os.environ.get("BLOOMRUN_KEEP_CLUSTER") == "1"
    keep_logs = request.session.testsfailed > 0
    running.stop(keep_state=keep_state, keep_logs=keep_logs)
    if keep_state or keep_logs:
        print(f"\ntest cluster logs kept in {running.layout.logs}", file=sys.stderr)
