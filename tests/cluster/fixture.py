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


@pytest.fixture(scope="session")
def _real_nodes_session(request, cluster):
    from tests.cluster.real_nodes import RealNodes

    nodes = RealNodes(cluster, count=2)

    def stop() -> None:
        # Registered before start(): a start that fails halfway is undone too.
        leftovers = nodes.stop()
        if leftovers:
            raise AssertionError("the real nodes left the host changed:\n" + "\n".join(leftovers))

    request.addfinalizer(stop)
    nodes.start()
    print(f"\nreal nodes {', '.join(nodes.names)} Ready in {nodes.start_seconds:.1f} s",
          file=sys.stderr)
    return nodes


@pytest.fixture
def real_nodes(request, _real_nodes_session):
    """Two real nodes (kubelet + containerd each) in pool `real`, started on first use for
    the session; only for tests marked `pods` (docs/cluster.md, "Real nodes")."""
    if request.node.get_closest_marker("pods") is None:
        pytest.fail("the real_nodes fixture is for tests marked `pods`")
    return _real_nodes_session
