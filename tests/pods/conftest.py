"""Fixtures of the `pods` tests: the project's images, imported into the real nodes."""

import pytest

from tests.cluster.oci import ImageSpec, write_archive
from tests.pods.images import Images
from tests.pods.netprobe import NETPROBE_IMAGE


@pytest.fixture(scope="session")
def _images_session(_real_nodes_session) -> Images:
    return Images(_real_nodes_session)


@pytest.fixture
def images(real_nodes, _images_session) -> Images:
    """`images.ref("trainer")`, `images.ref("operator")`: the tree's images, built by
    tools/images/build.sh (a cache hit after `make images`) and imported into the real
    nodes on first use in the session."""
    return _images_session


@pytest.fixture(scope="session")
def netprobe(_real_nodes_session, tmp_path_factory) -> str:
    """The network probe's image (tests/pods/netprobe.py), imported into the real nodes once."""
    bins = _real_nodes_session.network.policy.bins
    archive = write_archive(ImageSpec(NETPROBE_IMAGE, {"/netprobe": bins / "netprobe"}, ["/netprobe"]),
                            tmp_path_factory.mktemp("netprobe") / "netprobe.tar")
    _real_nodes_session.import_image(archive)
    return NETPROBE_IMAGE
