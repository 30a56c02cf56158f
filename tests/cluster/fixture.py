"""pytest plugin: the session-scoped `cluster` fixture (listed in tests/conftest.py).

The cluster starts on first use only, so test runs that need none pay nothing. Its state
stays on disk after a failing session (the path is printed) and is deleted otherwise.
BLOOMRUN_KEEP_CLUSTER=1 keeps it always.
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
    failed = request.session.testsfailed > 0
    keep = failed or os.environ.get("BLOOMRUN_KEEP_CLUSTER") == "1"
    running.stop(keep_state=keep)
    if keep:
        print(f"\ntest cluster state and logs kept in {running.layout.root}", file=sys.stderr)
