"""The entry point refuses bad input with one line naming what is wrong, exit status 2."""

import subprocess
import sys

import yaml

from tests.trainer.trainer_runs import REPO, config, write_corpus


def train(config_path, tmp_path):
    return subprocess.run([sys.executable, "-m", "bloomrun.trainer.train", "--config", str(config_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_invalid_config_names_the_field(tmp_path):
    cfg = config(tmp_path / "corpus", tmp_path / "ckpt")
    cfg["training"]["microBatchSize"] = 3  # 8 is not a multiple of 3
    cfg["model"]["hiddenSize"] = 30  # not divisible by 4 heads
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = train(path, tmp_path)
    assert done.returncode == 2
    assert "model: hiddenSize (30) must be divisible by numHeads (4)" in done.stderr
    assert "training: globalBatchSize (8) must be a multiple of microBatchSize (3)" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_data_file_is_named_before_training_starts(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    corpus.with_suffix(".bin").unlink()
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(corpus, tmp_path / "ckpt")))
    done = train(path, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "corpus.bin" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "ckpt").exists()
