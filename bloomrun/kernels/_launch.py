"""What the kernel files share: interpreter detection, launch rules, the partial-row sum.

Triton's interpreter (TRITON_INTERPRET=1, the CPU test suite) cannot time kernels, so
`@triton.autotune` with more than one config fails there; interpreted runs get one small
config. On a GPU the tests set BLOOMRUN_TRITON_AUTOTUNE=0 to skip the tuning sweep (each
config is a compilation), and training and the benchmarks tune over the full list.

The memory-bound kernels are launched by rule instead: bias-GELU and bias-SwiGLU by
`tile_for` and `row_groups` below, LayerNorm by its own `row_tile`. Their backward passes
reduce over rows into one fp32 partial row per program, and `sum_partial_rows` adds those.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick_configs(tuned: list[triton.Config], interpreted: triton.Config) -> list[triton.Config]:
    """The autotune list: one config when interpreting or tuning is off, else `tuned`."""
    if interpreting():
        return [interpreted]
    if os.environ.get("BLOOMRUN_TRITON_AUTOTUNE", "1") == "0":
        return tuned[:1]
    return tuned


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs_for(tensor: torch.Tensor, per_sm: int, fallback: int = 4) -> int:
    """How many persistent programs fill the device `tensor` lives on."""
    if tensor.is_cuda and not interpreting():
        return _sm_count(tensor.device.index or 0) * per_sm
    return fallback


def check_last_dim_contiguous(name: str, tensor: torch.Tensor) -> None:
    if tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tensor.stride()}")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """What a custom op hands its host function: stride 1 in the last dimension, any other strides.

    Inductor passes custom ops the strides seen while tracing by default (the
    `needs_exact_strides` layout constraint), so this copies nothing in practice; it keeps a
    layout another torch version or a gradient might choose from reaching a kernel's check.
    """
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------------- elementwise tiles

# The bias-activation kernels (bias_gelu.py, bias_swiglu.py) are launched by rule, not
# autotuned. Both stream (M, F) tensors and are memory-bound: a tile of 4096 values at 8
# warps is 16 fp32 values per thread per live tensor (two 16-byte bf16 loads), enough bytes
# in flight per SM without spilling. The autotuned list this replaces had 32 x 1024 tiles at
# 4 warps (256 values per thread per tensor; ptxas for sm_90a: 2.7 KB of spill stores in
# GELU's backward, 18.7 KB in SwiGLU's) and cost Python on every call; a rule also needs no
# tuning sweep at start-up. ptxas at F 8192 bf16 for this rule (4 x 1024 tiles, 8 warps):
# GELU forward 34 registers, backward 80, no spills. SwiGLU applies it to its half width F.
_TILE_VALUES = 4096
_MAX_BLOCK_F = 1024
_VALUES_PER_THREAD = 16


class Tile(NamedTuple):
    rows: int
    block_f: int
    num_warps: int


@functools.lru_cache(maxsize=None)
def tile_for(n_cols: int) -> Tile:
    """The (rows, columns, warps) of one tile for an activation `n_cols` wide."""
    block_f = min(_MAX_BLOCK_F, triton.next_power_of_2(n_cols))
    rows = max(1, _TILE_VALUES // block_f)
    return Tile(rows, block_f, max(1, rows * block_f // (32 * _VALUES_PER_THREAD)))


class RowGroups(NamedTuple):
    count: int  # programs along the rows: partial rows of dbias
    tiles_each: int  # row tiles per group (the last group may have fewer)


def row_groups(n_row_tiles: int, n_col_blocks: int, num_programs: int) -> RowGroups:
    """Splits the row tiles into contiguous runs so groups x column blocks ~ num_programs."""
    wanted = max(1, min(n_row_tiles, triton.cdiv(num_programs, n_col_blocks)))
    tiles_each = max(1, triton.cdiv(n_row_tiles, wanted))
    return RowGroups(max(1, triton.cdiv(n_row_tiles, tiles_each)), tiles_each)


# ---------------------------------------------------------------------- partial-row sum

# 32 partial rows x 64 columns per step (256 contiguous bytes per row), 4 warps, so even a
# 2048-wide parameter is split over 32 programs.
_REDUCE_ROWS, _REDUCE_BLOCK, _REDUCE_WARPS = 32, 64, 4


@triton.jit
def _sum_partial_rows_kernel(
    Out,  # (N,) output, any float dtype
    Partial,  # (P, N) fp32, contiguous
    Out2,  # (N,) a second output when PAIRED (LayerNorm's dB beside dW); else unused
    Partial2,  # (P, N) fp32, contiguous; read only when PAIRED
    n_partial,  # P
    n_cols,  # N
    PAIRED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Column block per program; the partial rows are added in a fixed order (deterministic).
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    acc2 = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for start in range(0, n_partial, ROWS):
        rows = start + tl.arange(0, ROWS)
        mask = (rows < n_partial)[:, None] & col_ok[None, :]
        offsets = rows[:, None] * n_cols + cols[None, :]
        acc += tl.load(Partial + offsets, mask=mask, other=0.0)
        if PAIRED:
            acc2 += tl.load(Partial2 + offsets, mask=mask, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=col_ok)
    if PAIRED:
        tl.store(Out2 + cols, tl.sum(acc2, axis=0).to(Out2.dtype.element_ty), mask=col_ok)


def sum_partial_rows(dtype: torch.dtype, *partials: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`p.sum(0).to(dtype)` for each of one or two contiguous (P, N) fp32 tensors of one shape,
    in one launch (LayerNorm sums its dW and dB partials together)."""
    first, last = partials[0], partials[-1]
    paired = last is not first
    n_partial, n_cols = first.shape
    out = torch.empty(n_cols, dtype=dtype, device=first.device)
    out2 = torch.empty(n_cols, dtype=dtype, device=first.device) if paired else out
    _sum_partial_rows_kernel[(triton.cdiv(n_cols, _REDUCE_BLOCK),)](
        out, first, out2, last, n_partial, n_cols,
        PAIRED=paired, ROWS=_REDUCE_ROWS, BLOCK=_REDUCE_BLOCK, num_warps=_REDUCE_WARPS,
    )
    return (out, out2) if paired else (out,)
