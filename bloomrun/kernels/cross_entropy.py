"""Fused linear + cross-entropy over the tied vocabulary, chunked so full logits never exist.

At vocabulary 250,880 the logits of 4k tokens are 4 GB in fp32. Instead, rows are taken
in chunks: the chunk's logits come from one matmul, a Triton kernel turns them into the
per-row loss and overwrites them in place with d(loss)/d(logits) = (softmax - onehot) /
n_valid, and two more matmuls fold that into d(hidden) and d(weight) at once. The
gradients are therefore computed in the forward (the loss is a scalar, so backward only
scales them by the incoming gradient), and the peak extra memory is one chunk of logits.

References: Liger-Kernel `ops/fused_linear_cross_entropy.py`; Wijmans et al., "Cut Your
Losses in Large-Vocabulary Language Models" (2024).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bloomrun.kernels._launch import interpreting

# Largest chunk of logits, in elements: 2^28 is 512 MB in bf16 (1024 rows at vocab 250,880),
# large enough that the three matmuls per chunk run at full speed.
MAX_CHUNK_ELEMENTS = 1 << 28


@triton.jit
def _cross_entropy_rows_kernel(
    Logits,  # (n, V), row stride stride_l; overwritten with d(loss)/d(logits)
    Targets,  # (n,) int64
    Loss,  # (n,) fp32 output: per-row loss, 0 for ignored rows
    NumValid,  # () int64: rows of the whole batch that are not ignored
    stride_l,
    vocab,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits = Logits + row * stride_l
    target = tl.load(Targets + row)
    offs = tl.arange(0, BLOCK_V)
    # Pass 1: online max and sum of exponentials over the row.
    running_max = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, vocab, BLOCK_V):
        x = tl.load(logits + start + offs, mask=start + offs < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, x)
        # Lanes that have seen only -inf keep a sum of 0 (avoid exp(-inf - -inf)).
        rescale = tl.where(new_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
        running_sum = running_sum * rescale + tl.where(x == float("-inf"), 0.0, tl.exp(x - new_max))
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    total = tl.sum(running_sum * tl.exp(running_max - row_max), axis=0)
    lse = row_max + tl.log(total)
    valid = target != ignore_index
    safe_target = tl.where(valid, target, 0)
    target_logit = tl.load(logits + safe_target).to(tl.float32)
    tl.store(Loss + row, tl.where(valid, lse - target_logit, 0.0))
    # Pass 2: overwrite the logits with (softmax - onehot) / n_valid (0 for ignored rows).
    scale = tl.where(valid, 1.0 / tl.load(NumValid).to(tl.float32), 0.0)
    for start in range(0, vocab, BLOCK_V):
        cols = start + offs
        x = tl.load(logits + cols, mask=cols < vocab, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(cols == safe_target, 1.0, 0.0)
        tl.store(logits + cols, (grad * scale).to(Logits.dtype.element_ty), mask=cols < vocab)


def _chunk_rows(num_rows: int, vocab: int) -> int:
    return max(1, min(num_rows, MAX_CHUNK_ELEMENTS // vocab))


def linear_cross_entropy_forward(hidden, weight, targets, ignore_index=-100):
    """Returns (loss, d_hidden, d_weight); the gradients are None where not required."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy wants hidden (N, C) and weight (V, C), got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"linear_cross_entropy wants targets ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy wants one dtype, got hidden {hidden.dtype} and weight {weight.dtype}")
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    targets = targets.to(torch.int64).contiguous()
    num_valid = (targets != ignore_index).sum()  # stays on the device: no host sync
    loss_rows = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
    d_weight = torch.zeros_like(weight) if weight.requires_grad else None
    block_v = min(triton.next_power_of_2(vocab), 1024 if interpreting() else 16384)
    chunk = _chunk_rows(num_rows, vocab)
    for start in range(0, num_rows, chunk):
        end = min(start + chunk, num_rows)
        hidden_chunk = hidden[start:end]
        logits = hidden_chunk @ weight.t()  # (n, V), becomes d(loss)/d(logits) in place
        _cross_entropy_rows_kernel[(end - start,)](
            logits, targets[start:end], loss_rows[start:end], num_valid,
            logits.stride(0), vocab, ignore_index, BLOCK_V=block_v, num_warps=1 if interpreting() else 16,
        )
        if d_hidden is not None:
            torch.matmul(logits, weight, out=d_hidden[start:end])
        if d_weight is not None:
            d_weight.addmm_(logits.t(), hidden_chunk)
    loss = loss_rows.sum() / num_valid
    return loss, d_hidden, d_weight


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index):
        loss, d_hidden, d_weight = linear_cross_entropy_forward(hidden, weight, targets, ignore_index)
        ctx.save_for_backward(d_hidden, d_weight)
        return loss

    @staticmethod
    def backward(ctx, d_loss):
        # Scaled in place: a scaled copy of d_weight would be another V x C tensor (1 GB at
        # vocab 250,880), which is what the chunking exists to avoid. The graph is used once.
        d_hidden, d_weight = ctx.saved_tensors
        if d_hidden is not None:
            d_hidden.mul_(d_loss.to(d_hidden.dtype))
        if d_weight is not None:
            d_weight.mul_(d_loss.to(d_weight.dtype))
        return d_hidden, d_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of softmax(hidden @ weight.T) against targets, ignoring ignore_index.

    hidden (N, C), weight (V, C), targets (N,). Under autocast both operands are cast to
    the autocast dtype first, as F.linear would be. Returns a scalar fp32 loss.
    """
    hidden, weight = autocast_operands(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index)


def autocast_operands(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands in the autocast dtype when autocast is on (what F.linear would use)."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype)


# ---------------------------------------------------------------------- as a torch custom op


@torch.library.custom_op("bloomrun::linear_cross_entropy_forward", mutates_args=())
def _linear_cross_entropy_forward_op(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, need_d_hidden: bool, need_d_weight: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, d_hidden, d_weight) with the gradients of the mean loss; a gradient not
    needed comes back as an empty (0,) tensor and costs nothing.

    The host function decides what to compute from `requires_grad`, which is always False
    inside an op (autograd has been handled above it), hence the two flags.
    """
    # Grad mode off: the host function's `matmul(out=...)` refuses inputs that require grad.
    # Autocast off: the caller has cast both operands already, as the eager path does.
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        loss, d_hidden, d_weight = linear_cross_entropy_forward(
            hidden.detach().requires_grad_(need_d_hidden), weight.detach().requires_grad_(need_d_weight),
            targets, ignore_index,
        )
    return loss, _or_empty(d_hidden, hidden), _or_empty(d_weight, weight)


def _or_empty(grad: Tensor | None, like: Tensor) -> Tensor:
    return grad if grad is not None else like.new_empty(0)


@_linear_cross_entropy_forward_op.register_fake
def _(hidden, weight, targets, ignore_index, need_d_hidden, need_d_weight):
    loss = hidden.new_empty((), dtype=torch.float32)
    d_hidden = torch.empty_like(hidden) if need_d_hidden else hidden.new_empty(0)
    d_weight = torch.empty_like(weight) if need_d_weight else weight.new_empty(0)
    return loss, d_hidden, d_weight


def _linear_cross_entropy_op_setup(ctx, inputs, output):
    _loss, d_hidden, d_weight = output
    ctx.save_for_backward(d_hidden, d_weight)
    ctx.need = inputs[4:6]
    ctx.mark_non_differentiable(d_hidden, d_weight)


def _linear_cross_entropy_op_grad(ctx, d_loss, _dd_hidden, _dd_weight):
    # Out of place (eager scales in place): in a compiled graph Inductor fuses this multiply
    # with what consumes the gradient, such as autocast's cast back to the fp32 weight.
    d_hidden, d_weight = ctx.saved_tensors
    need_d_hidden, need_d_weight = ctx.need
    return (
        d_hidden * d_loss.to(d_hidden.dtype) if need_d_hidden else None,
        d_weight * d_loss.to(d_weight.dtype) if need_d_weight else None,
        None, None, None, None,
    )


_linear_cross_entropy_forward_op.register_autograd(
    _linear_cross_entropy_op_grad, setup_context=_linear_cross_entropy_op_setup
)


def linear_cross_entropy_custom_op(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """`linear_cross_entropy` as torch.ops.bloomrun.linear_cross_entropy_forward, for
    torch.compile: operands cast to the autocast dtype first, as there."""
    hidden, weight = autocast_operands(hidden, weight)
    grad = torch.is_grad_enabled()
    loss, _, _ = _linear_cross_entropy_forward_op(
        hidden, weight, targets, ignore_index, grad and hidden.requires_grad, grad and weight.requires_grad
    )
    return loss


def linear_cross_entropy_reference(hidden, weight, targets, ignore_index=-100):
    """Plain torch: full logits, fp32 cross-entropy."""
    logits = hidden @ weight.t()
    return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
