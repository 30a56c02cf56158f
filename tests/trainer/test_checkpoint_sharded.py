"""Sharded checkpoints (checkpoint_sharded.py, checkpoint_shards.py): what each rank holds,
save on 4 ranks (T2 x DP2, FSDP2) and resume on 4 and on 2 (T2 x DP1) with the uninterrupted
run's losses, and the protocol's guarantees: checksums before use, a corrupt or half-written
checkpoint skipped, a malformed index refused, nothing unpickled, the consolidated export.

The spawned groups (gloo, CPU) train the SwiGLU + ALiBi model of tests/trainer/tp_workers.py,
whose fused (gate, up) projection is the layout DTensor's own offsets get wrong. Tolerance:
the same layout resumes bit for bit; another data-parallel degree sums gradients in another
order, hence 1e-5 relative on the loss (measured ~1e-7).
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from bloomrun.trainer import checkpoint as ckpt
from bloomrun.trainer import checkpoint_sharded, parallel
from bloomrun.trainer.checkpoint_shards import Entry, write_safetensors
from bloomrun.trainer.shard_layout import data_parallel_segments, pieces_of, tensor_segments
from tests.trainer import sharded_workers, tp_workers

SAVE_AT, STEPS = [4, 6], 10
SHARD = "step-00000006/shard-00002.safetensors"


# ------------------------------------------------------------------ pure: the pieces


def test_tensor_segments_of_each_placement():
    assert tensor_segments((8, 4), Replicate(), 1, 2) == [[(0, 0, 8)], [(0, 0, 4)]]
    assert tensor_segments((8, 4), Shard(1), 1, 2) == [[(0, 0, 8)], [(2, 0, 2)]]
    # SwiGLU's fused (gate, up) rows: rank 1 of 2 holds gate[2:4] and up[2:4] (rows 2:4, 6:8).
    assert tensor_segments((8, 4), _StridedShard(0, split_factor=2), 1, 2)[0] == [(2, 0, 2), (6, 2, 2)]
    with pytest.raises(ValueError, match="not a multiple of 2 blocks x 4 ranks"):
        tensor_segments((12, 4), _StridedShard(0, split_factor=2), 0, 4)


def test_fsdp_share_of_a_strided_shard_can_straddle_gate_and_up():
    # A tensor-parallel shard [gate rows 2:4 | up rows 6:8] split by FSDP2 over 3 replicas
    # (torch.chunk of 4 local rows: 2, 2, 0).
    local = [(2, 0, 2), (6, 2, 2)]
    assert data_parallel_segments(local, 0, 3) == [(2, 0, 2)]
    assert data_parallel_segments(local, 1, 3) == [(6, 0, 2)]
    assert data_parallel_segments(local, 2, 3) == []
    # Over 1 replica nothing changes; with 5 rows over 2 (3 + 2) the first share straddles.
    assert data_parallel_segments(local, 0, 1) == local
    assert data_parallel_segments([(0, 0, 2), (10, 2, 3)], 0, 2) == [(0, 0, 2), (10, 2, 1)]
    pieces = pieces_of([[(0, 0, 2), (10, 2, 1)], [(4, 0, 4)]])
    assert [(p.global_offset, p.local_offset, p.size) for p in pieces] == [((0, 4), (0, 0), (2, 4)),
                                                                          ((10, 4), (2, 0), (1, 4))]


def test_streamed_safetensors_file_reads_back_with_its_checksum(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    entries = [Entry(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()]
    written = write_safetensors(tmp_path / "x.safetensors", entries)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert written == {"sha256": ckpt.sha256_file(tmp_path / "x.safetensors"),
                       "bytes": (tmp_path / "x.safetensors").stat().st_size}


# ------------------------------------------------------- spawned groups: save and resume


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """4 ranks (T2 x DP2) train 10 steps, saving sharded checkpoints after steps 4 and 6."""
    root = tmp_path_factory.mktemp("sharded") / "checkpoints"
    result = tp_workers.spawn(sharded_workers.save_and_train, 4, root.parent / "out.json", sharded_workers.MODEL,
                              2, str(root), SAVE_AT, STEPS)
    return root, result


def copy_of(saved, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(saved[0], root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_each_ranks_pieces_are_the_unsharded_models(tmp_path, ranks):
    # T2 alone (a rank's SwiGLU projection is two pieces: its gate and up rows) and T2 x DP2
    # (FSDP2, where DTensor's own full_tensor() misplaces those rows): every piece, the
    # assembled full tensors (the consolidated format's) and copy_full_into, exactly.
    result = tp_workers.spawn(sharded_workers.layout, ranks, tmp_path / "out.json", sharded_workers.MODEL, 2)
    assert (result["piece_error"], result["gathered_error"], result["copied_error"]) == (0.0, 0.0, 0.0)
    projection = "h.0.mlp.dense_h_to_4h.weight"  # hidden 64, SwiGLU width 192: (384, 64)
    assert (projection in result["multi_piece"]) == (ranks == 2)
    assert result["covered"][projection] == [384 * 64 // ranks, 384 * 64 // ranks, 384 * 64]
    assert result["covered"]["h.0.input_layernorm.weight"] == [64 // (ranks // 2)] * 2 + [64]
    # Every element of every local tensor is in exactly one piece.
    assert all(pieces == local for pieces, local, _full in result["covered"].values())


@pytest.mark.slow
def test_every_rank_writes_its_own_shard_and_they_assemble_to_the_state(saved):
    root, result = saved
    assert result["errors"] == {"4": 0.0, "6": 0.0}  # assembled from the shards == gathered
    meta = ckpt.verify(root / "step-00000006")
    assert meta["layout"] == "sharded" and meta["optimizer_steps"] == 6
    shards = sorted(n for n in meta["files"] if n.startswith("shard-"))
    assert shards == [f"shard-{r:05d}.safetensors" for r in range(4)]
    # No rank wrote the whole state: each shard is about a quarter (replicated LayerNorms
    # and biases are written once, by one of the ranks holding them).
    total = sum(meta["files"][n]["bytes"] for n in shards)
    assert all(meta["files"][n]["bytes"] < 0.3 * total for n in shards)
    assert not list(root.glob(".tmp-*"))


@pytest.mark.slow
def test_resume_on_the_same_layout_is_exact(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    result = tp_workers.spawn(sharded_workers.resume_and_train, 4, tmp_path / "out.json", sharded_workers.MODEL,
                              2, str(root), STEPS)
    assert (result["step"], result["optimizer_steps"], result["load_error"]) == (6, 6, 0.0)
    assert result["losses"] == saved[1]["losses"][6:]


@pytest.mark.slow
@pytest.mark.parametrize("ranks, tensor", [(2, 2), (4, 4)])
def test_resume_on_another_layout_continues_the_uninterrupted_run(saved, tmp_path, ranks, tensor):
    root = copy_of(saved, tmp_path)  # written by T2 x DP2, read by T2 x DP1 and by T4 x DP1
    result = tp_workers.spawn(sharded_workers.resume_and_train, ranks, tmp_path / "out.json", sharded_workers.MODEL,
                              tensor, str(root), STEPS)
    assert (result["step"], result["optimizer_steps"], result["load_error"]) == (6, 6, 0.0)
    expected = saved[1]["losses"][6:]
    assert len(result["losses"]) == len(expected) == 4
    for got, want in zip(result["losses"], expected):
        assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_a_warm_start_takes_the_weights_and_fresh_moments(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    result = tp_workers.spawn(sharded_workers.warm_start, 2, tmp_path / "out.json", sharded_workers.MODEL, 2, str(root))
    assert result == {"weight_error": 0.0, "largest_moment": 0.0, "optimizer_steps": 0, "step": 6}


# ----------------------------------------------------- the protocol, on the saved files


@pytest.mark.slow
def test_a_corrupt_shard_is_refused_and_the_older_checkpoint_taken(saved, tmp_path, caplog):
    root = copy_of(saved, tmp_path)
    shard = root / SHARD
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one bit pattern in the tensor data, same size
    shard.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"shard-00002\.safetensors: checksum mismatch"):
        ckpt.verify(root / "step-00000006")
    world = parallel.World(rank=0, local_rank=0, world_size=1, node_rank=0, device="cpu")
    with caplog.at_level(logging.WARNING):
        path, meta = ckpt.choose(root, world, torch.device("cpu"))
    assert meta["step"] == 4 and path.name == "step-00000004"
    assert f"skipping checkpoint: {root / SHARD}: checksum mismatch" in caplog.text
    shard.write_bytes(bytes(data[:-8]))
    with pytest.raises(ckpt.CheckpointError, match=r"shard-00002\.safetensors: \d+ bytes, metadata says"):
        ckpt.verify(root / "step-00000006")


@pytest.mark.slow
def test_a_shard_only_another_rank_hashes_makes_every_rank_skip_the_checkpoint(saved, tmp_path):
    # Two ranks split the files to hash (sorted: index.json, rng, shard 0-3; rank 1 takes the
    # odd ones): a corrupt shard-00003 is seen by rank 1 alone, and both resume step 4.
    root = copy_of(saved, tmp_path)
    shard = root / "step-00000006" / "shard-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = tp_workers.spawn(sharded_workers.resume_and_train, 2, tmp_path / "out.json", sharded_workers.MODEL,
                              2, str(root), STEPS)
    assert (result["step"], result["optimizer_steps"], result["load_error"]) == (4, 4, 0.0)
    for got, want in zip(result["losses"], saved[1]["losses"][4:], strict=True):
        assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_half_written_checkpoints_are_skipped(saved, tmp_path, caplog):
    root = copy_of(saved, tmp_path)
    # A crash after the rename's source was filled but before metadata.json: the temp
    # folder, and (as a non-atomic copy would leave) a step folder without metadata.
    shutil.copytree(root / "step-00000006", root / ".tmp-step-00000008-77")
    (root / ".tmp-step-00000008-77" / "metadata.json").unlink()
    shutil.copytree(root / ".tmp-step-00000008-77", root / "step-00000007")
    with caplog.at_level(logging.WARNING):
        path, meta = ckpt.newest_complete(root)
    assert meta["step"] == 6
    assert "step-00000007: no metadata.json (incomplete checkpoint)" in caplog.text
    assert ".tmp-step" not in caplog.text  # never a candidate
    removed = ckpt.prune(root, keep_last=3)
    assert root / ".tmp-step-00000008-77" in removed and (root / "step-00000006").exists()


@pytest.mark.slow
@pytest.mark.parametrize("tamper, message", [
    (lambda e: e["chunks"][0]["offsets"].__setitem__(0, 10_000), "outside shape"),
    (lambda e: e["chunks"][0].__setitem__("file", "../model.safetensors"), "which metadata.json does not list"),
    (lambda e: e["chunks"].pop(), "chunks covering"),
])
def test_a_malformed_index_is_refused_even_with_a_matching_checksum(saved, tmp_path, tamper, message):
    root = copy_of(saved, tmp_path)
    step = root / "step-00000006"
    index = json.loads((step / "index.json").read_text())
    tamper(index["tensors"]["h.0.mlp.dense_h_to_4h.weight"])
    (step / "index.json").write_text(json.dumps(index))
    meta = json.loads((step / "metadata.json").read_text())
    meta["files"]["index.json"] = {"sha256": ckpt.sha256_file(step / "index.json"),
                                   "bytes": (step / "index.json").stat().st_size}
    (step / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match=rf"h\.0\.mlp\.dense_h_to_4h\.weight: .*{message}"):
        ckpt.verify(step)


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["../../shard-00009.safetensors", "shard-9.safetensors", "model.safetensors"])
def test_metadata_listing_files_a_sharded_checkpoint_does_not_have_is_refused(saved, tmp_path, extra):
    root = copy_of(saved, tmp_path)
    step = root / "step-00000006"
    meta = json.loads((step / "metadata.json").read_text())
    meta["files"][extra] = meta["files"]["rng.safetensors"]
    (step / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="lists files .* expected index.json, rng.safetensors and shard-"):
        ckpt.verify(step)
    del meta["files"][extra], meta["files"]["index.json"]  # the index unlisted: unchecked, so refused
    (step / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="lists files"):
        ckpt.verify(step)


@pytest.mark.slow
def test_reading_a_sharded_checkpoint_never_unpickles(saved, tmp_path, monkeypatch):
    root = copy_of(saved, tmp_path)
    step = root / "step-00000006"
    (step / ".metadata").write_bytes(pickle.dumps({"what DCP's own reader would load": 1}))  # not listed: ignored

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    ckpt.verify(step)
    weights = ckpt.read_tensors(step, "model.safetensors")
    assert weights["h.0.mlp.dense_h_to_4h.weight"].shape == (2 * 192, 64)


@pytest.mark.slow
def test_consolidate_writes_a_consolidated_checkpoint_of_the_same_tensors(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    out = tmp_path / "consolidated"
    assert checkpoint_sharded.main([str(root / "step-00000006"), str(out)]) == 0
    meta = ckpt.verify(out / "step-00000006")
    assert "layout" not in meta and set(meta["files"]) == set(ckpt.TENSOR_FILES)
    assert meta["consolidated_from"] == str(root / "step-00000006") and meta["step"] == 6
    for name in ("model.safetensors", "optimizer.safetensors"):
        got, want = ckpt.read_tensors(out / "step-00000006", name), ckpt.read_tensors(root / "step-00000006", name)
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert checkpoint_sharded.main([str(out / "step-00000006"), str(tmp_path / "again")]) == 2  # already consolidated


def test_the_format_field_defaults_to_consolidated_and_names_itself_when_wrong():
    from pydantic import ValidationError

    from bloomrun.trainer.config import TrainerConfig, format_validation_error

    base = {"data": {"sources": [{"path": "x"}]}, "training": {"globalBatchSize": 8, "trainSteps": 1}}
    assert TrainerConfig.model_validate(base).checkpoint.format == "consolidated"
    sharded = TrainerConfig.model_validate({**base, "checkpoint": {"format": "sharded"}})
    assert sharded.checkpoint.format == "sharded"
    with pytest.raises(ValidationError) as err:
        TrainerConfig.model_validate({**base, "checkpoint": {"format": "dcp"}})
    assert "checkpoint.format: Input should be 'consolidated' or 'sharded'" in format_validation_error(err.value)
