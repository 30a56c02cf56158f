"""`bloomctl checkpoint consolidate`: a sharded checkpoint written by two tensor-parallel ranks
becomes a consolidated one holding the engine's full state; a consolidated, corrupt or
missing input, and an output that would replace a checkpoint, are refused with what is wrong."""

import json
import shutil

import pytest
import torch

from bloomrun.cli.main import main
from bloomrun.trainer import checkpoint as ckpt
from tests.trainer import sharded_workers, tp_workers

STEP = "step-00000001"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Two ranks (T2, gloo) train one step and save it sharded: each writes its own shard."""
    root = tmp_path_factory.mktemp("sharded") / "checkpoints"
    result = tp_workers.spawn(sharded_workers.save_and_train, 2, root.parent / "out.json", sharded_workers.MODEL,
                              2, str(root), [1], 1)
    # The shards assemble to the state the ranks gathered from the engine, exactly: so the
    # full tensors read from them below are the engine's.
    assert result["errors"] == {"1": 0.0}
    return root / STEP


def consolidate(source, output, capsys):
    code = main(["checkpoint", "consolidate", str(source), "--output", str(output)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_sharded_checkpoint_becomes_a_consolidated_one_of_the_same_tensors(sharded, tmp_path, capsys):
    out = tmp_path / "consolidated"
    code, stdout, _ = consolidate(sharded, out, capsys)
    assert code == 0
    assert json.loads(stdout) == {"consolidated": str(out / STEP), "step": 1, "from": str(sharded)}
    meta = ckpt.verify(out / STEP)
    assert "layout" not in meta and set(meta["files"]) == set(ckpt.TENSOR_FILES)
    assert meta["step"] == 1 and meta["consolidated_from"] == str(sharded)
    for name in ("model.safetensors", "optimizer.safetensors"):
        got, want = ckpt.read_tensors(out / STEP, name), ckpt.read_tensors(sharded, name)
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    # Whole tensors, not one rank's half: SwiGLU's fused projection is (2 x 192, 64).
    assert ckpt.read_tensors(out / STEP, "model.safetensors")["h.0.mlp.dense_h_to_4h.weight"].shape == (384, 64)
    assert not list(out.glob(".tmp-*"))

    # Its output is consolidated already: refused before any tensor is read.
    code, _, err = consolidate(out / STEP, tmp_path / "again", capsys)
    assert code == 2 and "a consolidated checkpoint already" in err and str(out / STEP) in err
    assert not (tmp_path / "again").exists()


def test_a_corrupt_shard_is_refused_and_nothing_is_published(sharded, tmp_path, capsys):
    source = tmp_path / "checkpoints" / STEP
    shutil.copytree(sharded, source)
    shard = source / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one byte of tensor data, same size
    shard.write_bytes(bytes(data))
    out = tmp_path / "consolidated"
    code, stdout, err = consolidate(source, out, capsys)
    assert code == 2 and stdout == ""
    assert err.strip() == f"bloomctl checkpoint: error: {shard}: checksum mismatch"
    assert not (out / STEP).exists()


def test_a_folder_that_is_not_a_checkpoint_is_refused(sharded, tmp_path, capsys):
    code, _, err = consolidate(tmp_path / "missing", tmp_path / "out", capsys)
    assert code == 2 and f"{tmp_path / 'missing'}: no such checkpoint folder" in err
    half = tmp_path / "half"
    shutil.copytree(sharded, half)
    (half / "metadata.json").unlink()  # a save that crashed before publishing
    code, _, err = consolidate(half, tmp_path / "out", capsys)
    assert code == 2 and f"not a complete checkpoint: {half}: no metadata.json" in err
    assert not (tmp_path / "out").exists()


def test_an_output_that_would_replace_a_checkpoint_is_refused(sharded, tmp_path, capsys):
    # --output the source's own folder: publishing step-1 there would replace the source.
    root = tmp_path / "checkpoints"
    shutil.copytree(sharded, root / STEP)
    before = ckpt.verify(root / STEP)
    code, _, err = consolidate(root / STEP, root, capsys)
    assert code == 2 and f"{root / STEP} exists: remove it or choose another --output" in err
    assert ckpt.verify(root / STEP) == before and before["layout"] == "sharded"
