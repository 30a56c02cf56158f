import json
import logging

import pytest
import torch

from bloomrun.trainer import checkpoint as ckpt


def save(root, step, value=1.0):
    state = ckpt.TrainState(step=step, consumed_samples=8 * step, tokens=256 * step, restarts=2, optimizer_steps=step)
    return ckpt.publish(root, state, {"w": torch.full((3, 2), value)}, {"w.exp_avg": torch.zeros(3, 2)},
                        {"torch": torch.get_rng_state()})


def entries(root):
    """What a checkpoint folder holds besides its history (which only grows)."""
    return sorted(p.name for p in root.iterdir() if p.name != ckpt.HISTORY)


def test_publish_writes_metadata_with_checksums_and_loads_without_pickle(tmp_path):
    path = save(tmp_path, 5, value=2.5)
    assert path.name == "step-00000005"
    meta = ckpt.verify(path)
    assert (meta["step"], meta["consumed_samples"], meta["restarts"]) == (5, 40, 2)
    assert len(meta["files"]["model.safetensors"]["sha256"]) == 64
    assert ckpt.read_tensors(path, "model.safetensors")["w"].eq(2.5).all()
    assert ckpt.TrainState.from_dict(meta).tokens == 1280
    assert not list(tmp_path.glob(".tmp-*")), "the temporary folder is renamed, not left behind"


def test_newest_complete_skips_corrupt_and_incomplete_with_a_warning(tmp_path, caplog):
    for step in (1, 2, 3, 4):
        save(tmp_path, step)
    (tmp_path / "step-00000004/metadata.json").unlink()  # crashed before completing
    model = tmp_path / "step-00000003/model.safetensors"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")  # same size, one byte flipped
    broken_meta = tmp_path / "step-00000002/metadata.json"
    broken_meta.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        path, meta = ckpt.newest_complete(tmp_path)
    assert meta["step"] == 1 and path.name == "step-00000001"
    text = caplog.text
    assert "step-00000004: no metadata.json" in text
    assert "step-00000003/model.safetensors: checksum mismatch" in text
    assert "metadata.json: unreadable" in text


def test_truncated_file_and_missing_file_are_named(tmp_path):
    path = save(tmp_path, 1)
    (path / "optimizer.safetensors").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="optimizer.safetensors: 0 bytes, metadata says"):
        ckpt.verify(path)
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="optimizer.safetensors: missing"):
        ckpt.verify(path)
    assert ckpt.newest_complete(tmp_path) is None


def test_unknown_format_is_refused(tmp_path):
    path = save(tmp_path, 1)
    meta = json.loads((path / "metadata.json").read_text())
    (path / "metadata.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(ckpt.CheckpointError, match="format 99"):
        ckpt.verify(path)


@pytest.mark.parametrize("files", [
    {"../../outside": None},             # a name joined onto the folder: hashes any file
    {"/etc/hostname": None},
    {},                                  # nothing listed: the tensors would load unchecked
])
def test_metadata_naming_other_files_than_ours_is_refused(tmp_path, files):
    path = save(tmp_path, 1)
    meta = json.loads((path / "metadata.json").read_text())
    listed = {name: meta["files"]["model.safetensors"] for name in files}
    (path / "metadata.json").write_text(json.dumps({**meta, "files": listed}))
    with pytest.raises(ckpt.CheckpointError, match="lists files"):
        ckpt.verify(path)


def test_symlinked_step_folders_and_files_are_not_followed(tmp_path):
    other = save(tmp_path / "other-run", 9)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "step-00000009").symlink_to(other, target_is_directory=True)
    assert ckpt.newest_complete(mine) is None
    with pytest.raises(ckpt.CheckpointError, match="symbolic link"):
        ckpt.verify(mine / "step-00000009")
    real = save(mine, 1)
    (real / "model.safetensors").unlink()
    (real / "model.safetensors").symlink_to(other / "model.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors: missing"):
        ckpt.verify(real)


def test_prune_keeps_last_k_complete_and_removes_stale_temp_and_older_incomplete(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step)
    (tmp_path / "step-00000002/metadata.json").unlink()
    (tmp_path / "step-00000009").mkdir()  # newer but incomplete: kept, it may still be in use
    (tmp_path / ".tmp-step-00000006-123").mkdir()
    ckpt.prune(tmp_path, keep_last=2)
    assert entries(tmp_path) == ["step-00000004", "step-00000005", "step-00000009"]


def test_the_history_keeps_every_published_checkpoint_through_prunes_republishes_and_torn_lines(tmp_path):
    def published(step, loss):
        state = ckpt.TrainState(step=step, tokens=256 * step)
        ckpt.publish(tmp_path, state, {"w": torch.zeros(2)}, {}, {"torch": torch.get_rng_state()}, {"loss": loss})

    for step, loss in ((10, 3.0), (20, 2.5), (30, 2.0)):
        published(step, loss)
        ckpt.prune(tmp_path, keep_last=1)  # each save prunes right after publishing
    published(30, 1.9)  # a NaN rollback re-trained step 30, then saved it again: that one counts
    (tmp_path / ckpt.HISTORY).write_text((tmp_path / ckpt.HISTORY).read_text() + '{"step": 40, "tok')  # torn
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["step-00000030"]
    assert ckpt.read_history(tmp_path) == [{"step": 10, "tokens": 2560, "loss": 3.0},
                                           {"step": 20, "tokens": 5120, "loss": 2.5},
                                           {"step": 30, "tokens": 7680, "loss": 1.9}]
    (tmp_path / ckpt.HISTORY).unlink()  # a folder from before the history: its checkpoints still count
    assert ckpt.read_history(tmp_path) == [{"step": 30, "tokens": 7680, "loss": 1.9}]


def test_republishing_a_step_replaces_it(tmp_path):
    save(tmp_path, 3, value=1.0)
    save(tmp_path, 3, value=7.0)
    path, _ = ckpt.newest_complete(tmp_path)
    assert ckpt.read_tensors(path, "model.safetensors")["w"].eq(7.0).all()


def test_a_pickle_is_not_loaded(tmp_path):
    path = save(tmp_path, 1)
    torch.save({"w": torch.ones(1)}, path / "model.safetensors")  # a pickle under the right name
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.read_tensors(path, "model.safetensors")


def test_prune_keeps_checkpoints_whose_evaluation_is_pending_beyond_keep_last(tmp_path, caplog):
    """keepLast 2 of steps 100..600: 600 and 500 as before, and 200 (its evaluation Job
    runs) and 300 (queued), which keepLast alone would delete before they are scored."""
    from bloomrun.trainer.progress import HeldSteps

    for step in range(100, 700, 100):
        save(tmp_path, step)
    with caplog.at_level(logging.INFO):
        removed = ckpt.prune(tmp_path, keep_last=2, held=HeldSteps(frozenset({200, 300}), from_step=None))
    assert sorted(p.name for p in removed) == ["step-00000100", "step-00000400"]
    assert entries(tmp_path) == [
        "step-00000200", "step-00000300", "step-00000500", "step-00000600"]
    assert "beyond checkpoint.keepLast=2 for evaluation (pending, or not decided yet): steps [200, 300]" in caplog.text
    # Once the run's status no longer holds them (scored), the next prune removes them.
    ckpt.prune(tmp_path, keep_last=2, held=HeldSteps())
    assert entries(tmp_path) == ["step-00000500", "step-00000600"]


def test_prune_keeps_what_the_operator_has_not_decided_about_and_no_more(tmp_path):
    """From one read of the run: seenStep 300, checkpointStep 400 (reported, not looked at
    yet), 300 running. 400 may still be found due, 500 and 600 were published after the
    read; 100 and 200 can never become pending. Kept: keepLast + pending + undecided."""
    from bloomrun.trainer.progress import held_steps_of

    for step in range(100, 700, 100):
        save(tmp_path, step)
    run = {"spec": {"eval": {"suite": "bigscience-27"}},
           "status": {"progress": {"checkpointStep": 400}, "evaluation": {"seenStep": 300, "running": [300]}}}
    held = held_steps_of(run)
    ckpt.prune(tmp_path, keep_last=1, held=held)
    kept = [int(name[5:]) for name in entries(tmp_path)]
    assert kept == [300, 400, 500, 600]
    (tmp_path / "step-00000700").mkdir()  # a newer folder without metadata: still not counted
    ckpt.prune(tmp_path, keep_last=1, held=held_steps_of({"spec": {}, "status": run["status"]}))  # eval off
    assert entries(tmp_path) == ["step-00000600", "step-00000700"]


@pytest.mark.parametrize("pending, from_step", [({3, 17, 40}, 45), (set(), 0), ({1, 2}, None), ({49}, 50)])
def test_prune_keeps_at_most_keep_last_plus_pending_plus_undecided(tmp_path, pending, from_step):
    """The bound docs/eval.md states, on 50 published steps (prune looks at metadata.json only)."""
    from bloomrun.trainer.progress import HeldSteps

    for step in range(50):
        (tmp_path / ckpt.step_dir_name(step)).mkdir()
        (tmp_path / ckpt.step_dir_name(step) / ckpt.METADATA).write_text("{}")
    ckpt.prune(tmp_path, keep_last=3, held=HeldSteps(frozenset(pending), from_step))
    kept = {int(name[5:]) for name in entries(tmp_path)}
    undecided = set() if from_step is None else set(range(from_step, 50))
    assert kept == {47, 48, 49} | pending | undecided
    assert len(kept) <= 3 + len(pending) + len(undecided)
