"""Fixtures of the trainer's tests."""

import pytest

from tests.trainer.data_helpers import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small tokenized corpus for the runs of one test module (tests/trainer/trainer_runs.py)."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus")
