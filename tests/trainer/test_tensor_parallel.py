"""Tensor parallelism (bloomrun/trainer/tensor_parallel.py) on CPU process groups (gloo): the
sharded model trains as the unsharded one does, and ALiBi keeps the global heads' slopes.

Tolerance: fp32, 20 steps of AdamW at lr 3e-3 with clipping. The sharded model sums the
attention and MLP outputs and the loss's partial sums over ranks, which reorders fp32
additions only; the measured gap is ~1e-7 relative, the bar 1e-5 (loss) and 1e-4 (gradient
norm), far below any real difference (a wrong slope or shard moves the first loss by >1e-3).
"""

import pytest

from bloomrun.trainer.model.positions import alibi_slopes
from tests.trainer import tp_workers

pytestmark = pytest.mark.slow

VARIANTS = {  # position x activation; 12 heads: not a power of two
    "alibi-gelu": {"position": "alibi", "activation": "gelu"},
    "rotary-swiglu": {"position": "rotary", "activation": "swiglu"},
    "learned-swiglu": {"position": "learned", "activation": "swiglu"},
    "learned-gelu": {"position": "learned", "activation": "gelu"},
    "rotary-gelu": {"position": "rotary", "activation": "gelu"},
    "alibi-swiglu": {"position": "alibi", "activation": "swiglu"},
}


def assert_same_trajectory(result: dict) -> None:
    (ref_losses, ref_norms), (losses, norms) = result["reference"], result["parallel"]
    assert len(losses) == len(ref_losses) == 20
    assert ref_losses[-1] < ref_losses[0] - 0.05  # it learns, so the comparison means something
    for step, (a, b) in enumerate(zip(ref_losses, losses), 1):
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)
    for step, (a, b) in enumerate(zip(ref_norms, norms), 1):
        assert abs(a - b) <= 1e-4 * abs(a), (step, a, b)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tensor_2_trains_like_one_device(tmp_path, variant):
    model = {"hiddenSize": 96, "numHeads": 12, **VARIANTS[variant]}
    assert_same_trajectory(tp_workers.spawn(tp_workers.trajectories, 2, tmp_path / "out.json", model, 2, 1, 20))


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_tensor_2_by_data_2_with_fsdp_trains_like_one_device(tmp_path, zero):
    model = {"hiddenSize": 64, "numHeads": 4, "position": "alibi", "activation": "swiglu"}
    assert_same_trajectory(tp_workers.spawn(tp_workers.trajectories, 4, tmp_path / "out.json", model, 2, zero, 20))


@pytest.mark.parametrize("heads, tensor", [(12, 2), (20, 2), (12, 4), (20, 4)])
def test_alibi_shards_keep_the_global_slopes(tmp_path, heads, tensor):
    result = tp_workers.spawn(tp_workers.logits, tensor, tmp_path / "out.json",
                              {"hiddenSize": 8 * heads, "numHeads": heads, "position": "alibi"}, tensor)
    assert result["max_error"] <= 1e-5 * result["scale"], result
    share = heads // tensor
    full = alibi_slopes(heads).tolist()
    for rank, local in enumerate(result["local_slopes"]):
        assert local == pytest.approx(full[rank * share:(rank + 1) * share], rel=0, abs=0)
    # What the test guards against: a shard's own series is not the global heads' slice.
    assert alibi_slopes(share).tolist() != full[:share]


def test_the_vocabulary_parallel_loss_equals_the_full_one(tmp_path):
    result = tp_workers.spawn(tp_workers.vocab_parallel_loss, 2, tmp_path / "out.json")
    assert result["ignored"] > 0 and min(result["per_slice"]) > 0  # ignored rows, targets in both halves
    expected, got = result["loss"]
    assert got == pytest.approx(expected, rel=1e-6)
    assert result["d_hidden"] < 1e-6 and result["d_weight"] < 1e-6, result
