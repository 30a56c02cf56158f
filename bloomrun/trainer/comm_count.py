"""Count the bytes a rank sends through collectives, by kind, while a block of code runs:

    with CommCounter() as counter:
        ...one optimiser step...
    counter.sent  # {"all-reduce": bytes, "all-gather": ..., "send": ...}

Bytes are what this rank sends under ring algorithms over the call's group of n ranks
(NCCL's rings; gloo uses other algorithms, so this is the volume a GPU run would move, not
what gloo moved): all-reduce of M bytes 2 (n-1)/n M; all-gather of M bytes in all (the
output) and reduce-scatter of M in all (the input) (n-1)/n M; broadcast of M (n-1)/n M (a
pipelined chain sends (n-1) M over n ranks: the ranks' average); all-to-all of M (n-1)/n M;
send M; recv nothing (its peer's send counts it).

How calls are seen: every torch.distributed collective (DeepSpeed's comm and
torch.distributed.pipelining call it too) reaches its backend through the dispatcher as a
`torch.ops.c10d.*` op, and DTensor's redistributions as `torch.ops._c10d_functional.*`; a
TorchDispatchMode sees both, as torch's CommDebugMode (torch/distributed/tensor/debug/
_comm_mode.py) does to count calls. Seen on gloo CPU ranks (torch 2.15, DeepSpeed 0.19.8):
dist.all_reduce -> c10d.allreduce_; all_gather_into_tensor -> c10d._allgather_base_;
reduce_scatter_tensor -> c10d._reduce_scatter_base_; broadcast -> c10d.broadcast_; isend and
batch_isend_irecv -> c10d.send, irecv -> c10d.recv_; a DTensor Shard -> Replicate ->
_c10d_functional.all_gather_into_tensor (+ wait_tensor). The engines: DeepSpeed ZeRO-3's
parameter gathers and gradient reduce-scatter -> _allgather_base_ / _reduce_scatter_base_;
FSDP2 -> the same two ops; TP's activation all-reduces -> _c10d_functional.all_reduce; the
pipeline's hand-offs -> send / recv_. One step of each engine counted this way equals
bench/comm_volume.py's formulas, derived separately from the model's shape, to the byte but
for the step's scalars (tests/trainer/test_comm_count.py), so nothing they send escaped.
Not checked: a collective called on a ProcessGroup object from C++ (DDP's reducer, which
bloomrun does not use) would bypass Python dispatch modes. An op of these namespaces this
file has no rule for (gather, scatter, reduce) is kept in `unknown` by name, never guessed at.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroup
from torch.utils._python_dispatch import TorchDispatchMode

# -------------------------------------------------------------- bytes per call, pure


def all_reduce_bytes(nbytes: int, n: int) -> float:
    """Ring all-reduce of `nbytes`: reduce-scatter then all-gather, (n-1)/n each."""
    return 2 * (n - 1) / n * nbytes


def all_gather_bytes(total: int, n: int) -> float:
    """Ring all-gather whose output is `total` bytes: each rank passes on n-1 of n pieces."""
    return (n - 1) / n * total


def reduce_scatter_bytes(total: int, n: int) -> float:
    """Ring reduce-scatter whose input is `total` bytes."""
    return (n - 1) / n * total


def broadcast_bytes(nbytes: int, n: int) -> float:
    """A pipelined chain's (n-1) x nbytes, averaged over the n ranks."""
    return (n - 1) / n * nbytes


def send_bytes(nbytes: int, n: int) -> float:
    return float(nbytes)


def recv_bytes(nbytes: int, n: int) -> float:
    return 0.0


# ----------------------------------------------------------- which op is which kind


def _size(tensors) -> int:
    """Bytes of a tensor or a (nested) list of them."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_size(t) for t in tensors)


def _group_size(group) -> int:
    """A boxed ProcessGroup (c10d ops: the dispatcher hands a ScriptObject) or a group name
    (functional ops), as torch/distributed/_tools/fake_collectives.py reads them."""
    if isinstance(group, str):
        return dist.distributed_c10d._resolve_process_group(group).size()
    return ProcessGroup.unbox(group).size()


# op name -> (kind, bytes function, (args index of the measured tensors, of the group))
_C10D = {
    "allreduce_": ("all-reduce", all_reduce_bytes, 0, 1),
    "allreduce_coalesced_": ("all-reduce", all_reduce_bytes, 0, 1),
    "_allgather_base_": ("all-gather", all_gather_bytes, 0, 2),  # (output, input, group)
    "allgather_": ("all-gather", all_gather_bytes, 0, 2),  # (outputs per input, inputs, group)
    "allgather_into_tensor_coalesced_": ("all-gather", all_gather_bytes, 0, 2),
    "_reduce_scatter_base_": ("reduce-scatter", reduce_scatter_bytes, 1, 2),  # (output, input, group)
    "reduce_scatter_": ("reduce-scatter", reduce_scatter_bytes, 1, 2),
    "reduce_scatter_tensor_coalesced_": ("reduce-scatter", reduce_scatter_bytes, 1, 2),
    "broadcast_": ("broadcast", broadcast_bytes, 0, 1),
    "alltoall_base_": ("all-to-all", all_gather_bytes, 1, 2),
    "send": ("send", send_bytes, 0, 1),
    "recv_": ("recv", recv_bytes, 0, 1),
    "recv_any_source_": ("recv", recv_bytes, 0, 1),
}
_FUNCTIONAL = {  # the group is named last; all-gather's output is the input x group size
    "all_reduce": ("all-reduce", all_reduce_bytes),
    "all_reduce_": ("all-reduce", all_reduce_bytes),
    "all_reduce_coalesced": ("all-reduce", all_reduce_bytes),
    "all_reduce_coalesced_": ("all-reduce", all_reduce_bytes),
    "all_gather_into_tensor": ("all-gather", all_gather_bytes),
    "all_gather_into_tensor_out": ("all-gather", all_gather_bytes),
    "all_gather_into_tensor_coalesced": ("all-gather", all_gather_bytes),
    "reduce_scatter_tensor": ("reduce-scatter", reduce_scatter_bytes),
    "reduce_scatter_tensor_coalesced": ("reduce-scatter", reduce_scatter_bytes),
    "all_to_all_single": ("all-to-all", all_gather_bytes),
    "broadcast": ("broadcast", broadcast_bytes),
    "broadcast_": ("broadcast", broadcast_bytes),
}
_IGNORED = {"wait_tensor", "_wrap_tensor_autograd", "barrier", "monitored_barrier_"}  # no payload
_NAMESPACES = {"c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd"}


def classify(namespace: str, name: str, args: tuple) -> tuple[str, float] | None:
    """(kind, bytes this rank sends) of one dispatched op; None when it moves no payload.
    KeyError for a collective without a rule here."""
    if name in _IGNORED:
        return None
    if namespace == "c10d":
        kind, sent, data, group = _C10D[name]
        return kind, sent(_size(args[data]), _group_size(args[group]))
    kind, sent = _FUNCTIONAL[name]
    n = _group_size(args[-1])
    nbytes = _size(args[0])
    if kind == "all-gather":
        nbytes *= n  # the functional op takes the input; the ring's total is the output
    return kind, sent(nbytes, n)


class CommCounter(TorchDispatchMode):
    """Bytes sent (`sent`) and calls (`calls`) by kind while active; ops it has no rule for in
    `unknown` (name -> calls). Every op goes through Python while it is active: slow, for
    counting runs only."""

    def __init__(self):
        super().__init__()
        self.sent: Counter = Counter()
        self.calls: Counter = Counter()
        self.unknown: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in _NAMESPACES:
            name = func._opname
            try:
                seen = classify(func.namespace, name, args)
            except KeyError:
                self.unknown[f"{func.namespace}.{name}"] += 1
            else:
                if seen is not None:
                    self.sent[seen[0]] += seen[1]
                    self.calls[seen[0]] += 1
        return func(*args, **(kwargs or {}))
