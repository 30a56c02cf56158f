"""Rank 0 checks the data once every rank is in the group (issue 19): the others wait for its
verdict without a collective, so a first start's full scan of a big corpus that outlasts the
group's timeout no longer times them out. Two CPU ranks (gloo) in spawned processes, with the
group's timeout cut to TIMEOUT_S and rank 0's check slowed to CHECK_S, longer than it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp
import yaml

from bloomrun.trainer import elastic
from tests.trainer.data_helpers import write_corpus, write_dataset
from tests.trainer.trainer_runs import config

TIMEOUT_S = 8
CHECK_S = 20  # rank 0's data check: longer than the group's timeout


def _rank(rank: int, port: int, config_path: str, out: str) -> None:
    """One rank: a Trainer built as a pod's would be, then one all-reduce over the group."""
    import datetime
    import os
    import time

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import deepspeed
    import torch
    import torch.distributed as dist

    from bloomrun.trainer import data
    from bloomrun.trainer.train import load_config
    from bloomrun.trainer.trainer import Trainer

    real_init = deepspeed.init_distributed
    deepspeed.init_distributed = lambda **kw: real_init(**{**kw, "timeout": datetime.timedelta(seconds=TIMEOUT_S)})
    real_validate = data.validate_data

    def slow_validate(*args, **kwargs):  # a first start's full scan of a big file
        time.sleep(CHECK_S)
        real_validate(*args, **kwargs)

    data.validate_data = slow_validate
    result: dict = {"rank": rank}
    try:
        trainer = Trainer(load_config(config_path), serve_metrics=False)
        total = torch.ones(1)
        dist.all_reduce(total)
        result["sum"] = float(total.item())
        trainer.close()
    except Exception as err:  # noqa: BLE001  the test reads what each rank met
        result["error"] = f"{type(err).__name__}: {err}"
    Path(f"{out}.{rank}").write_text(json.dumps(result))


def start(tmp_path: Path, corpus: Path) -> list[dict]:
    cfg = config(corpus, tmp_path / "checkpoints")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "result"
    mp.start_processes(_rank, args=(elastic.free_ports(1)[0], str(path), str(out)), nprocs=2,
                       start_method="spawn", join=True)
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]


def test_the_others_wait_for_a_data_check_longer_than_the_groups_timeout(tmp_path):
    results = start(tmp_path, write_corpus(tmp_path / "corpus"))
    assert [r.get("error") for r in results] == [None, None], results
    assert [r["sum"] for r in results] == [2.0, 2.0]  # the group works after the wait


def test_data_rank_0_refuses_is_refused_on_every_rank_with_its_message(tmp_path):
    # Token ids past the tiny model's vocabulary: rank 0's check refuses, after its slow scan.
    corpus = write_dataset(tmp_path / "bad", [np.arange(60_000, 60_100)] * 4)
    results = start(tmp_path, corpus)
    assert all("is not below the model's vocabSize" in r.get("error", "") for r in results), results
    assert results[1]["error"].startswith("ValueError: rank 0: ")
