"""A run with a batch ramp-up resumes past the ramp on more ranks than its first batch has
samples per micro-batch: DeepSpeed's batch is sized for the step being trained, not for the
ramp's first step (which 4 ranks cannot split: 2 sequences)."""

import pytest

from tests.trainer.trainer_runs import Run, checkpoint_steps, config, write_corpus

pytestmark = pytest.mark.slow


def test_resume_past_the_ramp_on_a_world_the_first_batch_does_not_divide(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    ramp = {"rampup": {"start": 2, "increment": 2, "samples": 16}}  # batches 2, 4, 6, then 8
    first = Run(tmp_path / "one-rank", config(corpus, tmp_path / "checkpoints", steps=6, every=6, micro=1, **ramp),
                ranks=1).run()
    batches = [len(step["indices"]) for _, step in sorted(first.global_steps().items())]
    assert batches == [2, 2, 2, 4, 4, 6]  # the ramp; 20 samples consumed, past its 16
    assert checkpoint_steps(tmp_path / "checkpoints") == [6]
    resumed = Run(tmp_path / "four-ranks", config(corpus, tmp_path / "checkpoints", steps=8, every=8, micro=1, **ramp),
                  ranks=4).run()
    steps = resumed.global_steps()
    assert sorted(steps) == [7, 8], resumed.output()[-2000:]
    assert [len(steps[s]["indices"]) for s in (7, 8)] == [8, 8]
