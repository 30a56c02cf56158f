"""The logged and exported gradient norm is the real, unclipped one, also under ZeRO
stage 0 (what every single-rank run uses), where DeepSpeed clips without keeping it."""

import math
import re
import subprocess
import sys

import yaml

from tests.trainer.trainer_runs import REPO, config, write_corpus

GRAD_NORM = re.compile(r"step (\d+)/\d+ \| loss \S+ \| grad_norm (\S+)")


def test_single_rank_stage_0_reports_the_unclipped_gradient_norm(tmp_path):
    cfg = config(write_corpus(tmp_path / "corpus"), tmp_path / "ckpt", steps=3, zero=1, every=100)
    # Clipping at 1e-3 leaves a real gradient far above the clip; a clipped norm would be 0.001.
    cfg["optim"]["gradClip"] = 1e-3
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "bloomrun.trainer.train", "--config", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ZeRO 0" in done.stderr  # one rank runs stage 0 whatever the manifest says
    norms = {int(step): float(value) for step, value in GRAD_NORM.findall(done.stderr)}
    assert sorted(norms) == [1, 2, 3]
    for step, norm in norms.items():
        assert math.isfinite(norm) and norm > 0.01, (step, norm)
