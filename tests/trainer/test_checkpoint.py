import json
import logging

import pytest
import torch

from bloomrun.trainer import checkpoint as ckpt


def save(root, step, value=1.0):
    state = ckpt.TrainState(step=step, consumed_samples=8 * step, tokens=256 * step, restarts=2, optimizer_steps=step)
    return ckpt.publish(root, state, {"w": torch.full((3, 2), value)}, {"w.exp_avg": torch.zeros(3, 2)},
                        {"torch": torch.get_rng_state()})


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005", "step-00000009"]


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
