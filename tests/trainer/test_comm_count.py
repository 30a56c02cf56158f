"""bloomrun/trainer/comm_count.py: bytes per collective on 2 gloo ranks, and one optimiser
step's counted bytes against bench/comm_volume.py's formulas (which would catch a wrong one)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from bench import comm_volume
from bloomrun.trainer import comm_count
from bloomrun.trainer.comm_count import CommCounter
from tests.trainer.tp_workers import spawn

SCALARS = 32  # bytes: the step's scalar all-reduces (norm, skip flag: 12-24 counted), which the formulas leave out


def test_bytes_per_kind_are_the_ring_volumes():
    assert comm_count.all_reduce_bytes(1000, 4) == 1500  # 2 (n-1)/n M
    assert comm_count.all_gather_bytes(1000, 4) == 750  # (n-1)/n of the output
    assert comm_count.reduce_scatter_bytes(1000, 4) == 750  # (n-1)/n of the input
    assert comm_count.broadcast_bytes(1000, 4) == 750
    assert comm_count.send_bytes(1000, 4) == 1000
    assert comm_count.recv_bytes(1000, 4) == 0
    assert comm_count.all_reduce_bytes(1000, 1) == 0


def _counted(fn) -> dict:
    with CommCounter() as counter:
        fn()
    return {"sent": dict(counter.sent), "calls": dict(counter.calls), "unknown": dict(counter.unknown)}


def collectives(rank: int, world_size: int) -> dict:
    """What the counter saw for each collective, on every rank; 10 fp32 = 40 bytes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    ten = torch.ones(10)

    def p2p():
        if rank == 0:
            dist.isend(ten, 1).wait()
        else:
            dist.irecv(ten, 0).wait()

    mesh = init_device_mesh("cpu", (world_size,))
    sharded = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])  # 48 bytes in all
    seen = {
        "all_reduce": _counted(lambda: dist.all_reduce(ten)),
        "all_reduce_bf16": _counted(lambda: dist.all_reduce(torch.ones(10, dtype=torch.bfloat16))),
        "all_gather": _counted(lambda: dist.all_gather_into_tensor(torch.empty(20), ten)),
        "reduce_scatter": _counted(lambda: dist.reduce_scatter_tensor(torch.empty(5), ten)),
        "broadcast": _counted(lambda: dist.broadcast(ten, 0)),
        "p2p": _counted(p2p),
        "dtensor": _counted(lambda: sharded.redistribute(mesh, [Replicate()]).to_local()),
        "gather": _counted(lambda: dist.gather(ten, [torch.empty(10) for _ in range(world_size)] if rank == 0
                                               else None, dst=0)),
    }
    every = [None] * world_size
    dist.all_gather_object(every, seen)
    return {"ranks": every}


def test_counts_each_collective_on_two_gloo_ranks(tmp_path):
    first, second = spawn(collectives, 2, tmp_path / "out.json")["ranks"]
    for rank in (first, second):
        assert rank["all_reduce"]["sent"] == {"all-reduce": 40.0}
        assert rank["all_reduce_bf16"]["sent"] == {"all-reduce": 20.0}
        assert rank["all_gather"]["sent"] == {"all-gather": 40.0}
        assert rank["reduce_scatter"]["sent"] == {"reduce-scatter": 20.0}
        assert rank["broadcast"]["sent"] == {"broadcast": 20.0}
        assert rank["dtensor"]["sent"] == {"all-gather": 24.0}  # a functional all-gather
        # No rule for gather: kept by name, not guessed at.
        assert rank["gather"] == {"sent": {}, "calls": {}, "unknown": {"c10d.gather_": 1}}
    assert first["p2p"]["sent"] == {"send": 40.0}
    assert second["p2p"]["sent"] == {"recv": 0.0} and second["p2p"]["calls"] == {"recv": 1}


@pytest.mark.parametrize("layout", [(2, 1, 1, 3), (2, 2, 1, 3), (4, 2, 1, 1), (4, 2, 1, 3)],
                         ids=["zero3-dp2", "tp2", "tp2-dp2-zero1", "tp2-dp2-zero3"])
def test_one_step_counted_equals_the_formula(layout):
    """DeepSpeed ZeRO-3 over 2 ranks (the persistent small weights, the weights kept for the
    backward) and T2 through MeshEngine (activation, embedding and vocabulary-parallel loss
    all-reduces) at the bench's small shape: every kind within the scalars' bytes. T2 x DP2 at
    ZeRO 1 and 3, 2 micro-batches a replica: FSDP2 gathers and reduce-scatters once a step at 1,
    every micro-batch (and the blocks again for the backward) at 3."""
    gpus, tensor, pipeline, zero = layout
    counts = comm_volume.measure(gpus, tensor, pipeline, zero)
    assert all(not rank["unknown"] for rank in counts), counts
    counted = comm_volume.mean_by_kind(counts)
    expected = comm_volume.by_kind(comm_volume.formula(comm_volume.small_config(*layout), gpus))
    assert expected and all(expected.values())
    for kind in set(counted) | set(expected):
        assert abs(counted.get(kind, 0.0) - expected.get(kind, 0.0)) <= SCALARS, (kind, counted, expected)
