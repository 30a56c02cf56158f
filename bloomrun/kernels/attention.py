"""Causal flash attention with ALiBi computed in the kernel, forward and backward, in Triton.

q, k, v are (B, T, H, D) and may be strided views of the fused QKV projection (only the
last dimension must be contiguous), so the model never copies them into (B, H, T, D).
Scores are q.k / sqrt(D) + slope_h * (j - i) for key j <= query i: the ALiBi bias is built
from the head's slope and the two positions inside the kernel, never stored. With
`alibi_slopes=None` there is no position term (the paper's "none" ablation; rotary is
applied to q and k beforehand by `rotary.apply_rotary`).

Forward: one program per (query block, batch*head) keeps a running max and sum in fp32
(online softmax in base 2) and stores the log-sum-exp per row. The ALiBi term enters as
slope_h * (j - start of the query block): a per-key vector, one add per score, because the
softmax cancels the per-row remainder slope_h * (i - block start); the stored log-sum-exp
has that remainder taken back out, so the backward sees the true one. Taking positions
relative to the block keeps the added values small (fp32 keeps its precision); the dQ
kernel splits slope_h * (j - i) - lse_i the same way into a key and a query vector. Backward: a small kernel
computes delta = rowsum(dO * O), then one kernel per key block accumulates dK and dV over
the query blocks at or after it, and one per query block accumulates dQ over the key
blocks up to it. Each loop is split in two: blocks strictly inside the causal triangle
need no mask, only the blocks on the diagonal pay for it.

References: Dao, "FlashAttention-2" (2023); Triton tutorial 06 (fused-attention); Press et
al., "Train Short, Test Long" (ALiBi, 2022).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from bloomrun.kernels._launch import check_last_dim_contiguous, last_dim_contiguous, pick_configs


def _forward_configs() -> list[triton.Config]:
    tuned = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=4),
    ]
    return pick_configs(tuned, triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1))


def _dkdv_configs() -> list[triton.Config]:
    # BLOCK_N (keys held in registers) must be a multiple of BLOCK_M (queries streamed).
    # The first entry is the default when tuning is off: dK and dV accumulators of a
    # 128-key block are 2 x 128 x D fp32, which needs 8 warps' registers at D = 128.
    tuned = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    ]
    return pick_configs(tuned, triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1))


def _dq_configs() -> list[triton.Config]:
    # BLOCK_M (queries held) must be a multiple of BLOCK_N (keys streamed).
    tuned = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    ]
    return pick_configs(tuned, triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1))


# ------------------------------------------------------------------------------ forward


@triton.jit
def _head_dim_mask(offs_d, head_dim, EVEN_D: tl.constexpr):
    # When D is the block width the mask is a compile-time constant, so loads need no
    # per-element predicate along D and stay 16-byte vectors.
    if EVEN_D:
        return tl.full(offs_d.shape, 1, tl.int1)
    else:
        return offs_d < head_dim


@triton.jit
def _forward_block(
    acc, m_i, l_i, q, k_ptrs, v_ptrs, start_m, start_n, offs_m, offs_n, slope, qk_scale, seq_len,
    stride_kt, stride_vt, d_ok,
    ON_DIAGONAL: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Scores here are shifted per row by slope * (i - start_m) against the true ones (see
    # the kernel): the softmax cancels it, and the ALiBi term costs one add per score.
    cols = start_n + offs_n
    if ON_DIAGONAL:
        key_ok = cols < seq_len
        k = tl.load(k_ptrs + start_n * stride_kt, mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * stride_kt, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=d_ok[None, :], other=0.0)
    qk = tl.dot(q, k, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    if HAS_ALIBI:
        s = qk * qk_scale + (slope * (cols - start_m).to(tl.float32))[None, :]  # log2 units
        if ON_DIAGONAL:
            s = tl.where((offs_m[:, None] >= cols[None, :]) & key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
    else:
        # Scaling the row max instead of every score lets the scale ride in the exponent's
        # FMA (qk_scale > 0, so the max commutes with it).
        if ON_DIAGONAL:
            qk = tl.where((offs_m[:, None] >= cols[None, :]) & key_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.autotune(configs=_forward_configs(), key=["BLOCK_D", "EVEN_D", "HAS_ALIBI"])
@triton.jit
def _attention_forward_kernel(
    Q, K, V,  # (B, T, H, D), strided; last dim contiguous
    O,  # (B, T, H, D) output, contiguous
    LSE,  # (B * H, T) fp32 output: log2-sum-exp2 of each query row's scores
    Slopes,  # (H,) fp32 ALiBi slopes (unused without ALiBi)
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    num_heads, seq_len, head_dim, qk_scale,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The last query blocks see the most keys: launch them first so the tail is short.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    batch_head = tl.program_id(1)
    b = (batch_head // num_heads).to(tl.int64)
    h = (batch_head % num_heads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, head_dim, EVEN_D)
    q_ok = offs_m < seq_len
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=q_ok[:, None] & d_ok[None, :], other=0.0,
    )
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, N)
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]  # (N, D)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + h) * 1.4426950408889634  # log2(e) as a literal: compiled Triton refuses float globals
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # Keys before this query block: all visible, no mask. Key 0 is among them for every row
    # of every block but the first, so the running max is finite before the diagonal.
    for start_n in range(0, start_m, BLOCK_N):
        acc, m_i, l_i = _forward_block(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, start_m, start_n, offs_m, offs_n, slope, qk_scale, seq_len,
            stride_kt, stride_vt, d_ok, False, HAS_ALIBI, DOT_PRECISION,
        )
    for start_n in range(start_m, start_m + BLOCK_M, BLOCK_N):
        acc, m_i, l_i = _forward_block(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, start_m, start_n, offs_m, offs_n, slope, qk_scale, seq_len,
            stride_kt, stride_vt, d_ok, True, HAS_ALIBI, DOT_PRECISION,
        )
    acc = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i)
    if HAS_ALIBI:  # undo the per-row shift: the backward needs the true log-sum-exp
        lse -= slope * (offs_m - start_m).to(tl.float32)
    tl.store(LSE + batch_head.to(tl.int64) * seq_len + offs_m, lse, mask=q_ok)
    tl.store(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        acc.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :],
    )


# ----------------------------------------------------------------------------- backward


@triton.jit
def _attention_backward_delta_kernel(
    Delta,  # (B * H, T) fp32 output: rowsum(dO * O)
    O, DO,  # (B, T, H, D), contiguous
    num_heads, seq_len, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    batch_head = tl.program_id(1).to(tl.int64)
    b = batch_head // num_heads
    h = batch_head % num_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq_len)[:, None] & (offs_d < head_dim)[None, :]
    offsets = ((b * seq_len + offs_m[:, None]) * num_heads + h) * head_dim + offs_d[None, :]
    o = tl.load(O + offsets, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + batch_head * seq_len + offs_m, tl.sum(o * do, axis=1), mask=offs_m < seq_len)


@triton.jit
def _dkdv_block(
    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, start_m, offs_n, offs_m0, slope,
    qk_scale, seq_len, stride_qt, stride_gt, d_ok,
    ON_DIAGONAL: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_m = start_m + offs_m0
    row_ok = offs_m < seq_len
    q_t = tl.load(q_ptrs + start_m * stride_qt, mask=row_ok[None, :] & d_ok[:, None], other=0.0)  # (D, M)
    do = tl.load(do_ptrs + start_m * stride_gt, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (M, D)
    # Rows past the end get lse = +inf, so their probabilities are exactly 0.
    lse = tl.load(lse_ptrs + start_m, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptrs + start_m, mask=row_ok, other=0.0)
    qk_t = tl.dot(k, q_t, input_precision=DOT_PRECISION)  # (N, M)
    if HAS_ALIBI:
        # Per-score form on purpose: the dQ kernel's split into a key and a query vector
        # made ptxas spill more here (156 bytes instead of 104 at 64 x 128, 8 warps, sm_90a;
        # `python -m bench.compile_report`), and this kernel showed no ALiBi cost on the GPU.
        p_t = tl.math.exp2(qk_t * qk_scale + slope * (offs_n[:, None] - offs_m[None, :]).to(tl.float32) - lse[None, :])
    else:
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
    if ON_DIAGONAL:
        p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (N, M)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=_dkdv_configs(), key=["BLOCK_D", "EVEN_D", "HAS_ALIBI"])
@triton.jit
def _attention_backward_dkdv_kernel(
    DK, DV,  # (B, T, H, D) outputs, contiguous
    Q, K, V,  # (B, T, H, D), strided; last dim contiguous
    DO,  # (B, T, H, D), contiguous (same strides as DK)
    LSE, Delta,  # (B * H, T) fp32
    Slopes,  # (H,) fp32
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_gh,  # of DK, DV and DO
    num_heads, seq_len, head_dim, qk_scale, sm_scale,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    batch_head = tl.program_id(1)
    b = (batch_head // num_heads).to(tl.int64)
    h = (batch_head % num_heads).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, head_dim, EVEN_D)
    key_mask = (offs_n < seq_len)[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=key_mask, other=0.0)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m0[None, :] * stride_qt + offs_d[:, None]  # (D, M)
    do_ptrs = DO + b * stride_gb + h * stride_gh + offs_m0[:, None] * stride_gt + offs_d[None, :]  # (M, D)
    row_base = batch_head.to(tl.int64) * seq_len + offs_m0
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + h) * 1.4426950408889634  # log2(e) as a literal: compiled Triton refuses float globals
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # Query blocks overlapping this key block's diagonal need the causal mask...
    for start_m in range(start_n, start_n + BLOCK_N, BLOCK_M):
        dk, dv = _dkdv_block(
            dk, dv, k, v, q_ptrs, do_ptrs, LSE + row_base, Delta + row_base, start_m, offs_n, offs_m0,
            slope, qk_scale, seq_len, stride_qt, stride_gt, d_ok, True, HAS_ALIBI, DOT_PRECISION,
        )
    # ...the ones after it see every key of the block.
    for start_m in range(start_n + BLOCK_N, seq_len, BLOCK_M):
        dk, dv = _dkdv_block(
            dk, dv, k, v, q_ptrs, do_ptrs, LSE + row_base, Delta + row_base, start_m, offs_n, offs_m0,
            slope, qk_scale, seq_len, stride_qt, stride_gt, d_ok, False, HAS_ALIBI, DOT_PRECISION,
        )
    out = b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gt + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=key_mask)


@triton.jit
def _dq_block(
    dq, q, do, row_term, delta, k_ptrs, v_ptrs, start_m, start_n, offs_m, offs_n0, slope, qk_scale, seq_len,
    stride_kt, stride_vt, d_ok,
    ON_DIAGONAL: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = start_n + offs_n0
    key_ok = offs_n < seq_len
    k_t = tl.load(k_ptrs + start_n * stride_kt, mask=key_ok[None, :] & d_ok[:, None], other=0.0)  # (D, N)
    v_t = tl.load(v_ptrs + start_n * stride_vt, mask=key_ok[None, :] & d_ok[:, None], other=0.0)  # (D, N)
    qk = tl.dot(q, k_t, input_precision=DOT_PRECISION)
    if HAS_ALIBI:
        # row_term = lse + slope (m - start_m), once per program; slope (n - start_m) is a
        # key vector per tile: one add per score instead of a subtract, convert and FMA.
        p = tl.math.exp2(qk * qk_scale + (slope * (offs_n - start_m).to(tl.float32))[None, :] - row_term[:, None])
    else:  # row_term = lse
        p = tl.math.exp2(qk * qk_scale - row_term[:, None])
    if ON_DIAGONAL:
        p = tl.where((offs_m[:, None] >= offs_n[None, :]) & key_ok[None, :], p, 0.0)
    dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=_dq_configs(), key=["BLOCK_D", "EVEN_D", "HAS_ALIBI"])
@triton.jit
def _attention_backward_dq_kernel(
    DQ,  # (B, T, H, D) output, contiguous
    Q, K, V,  # (B, T, H, D), strided; last dim contiguous
    DO,  # (B, T, H, D), contiguous (same strides as DQ)
    LSE, Delta,  # (B * H, T) fp32
    Slopes,  # (H,) fp32
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_gh,
    num_heads, seq_len, head_dim, qk_scale, sm_scale,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # most work first
    batch_head = tl.program_id(1)
    b = (batch_head // num_heads).to(tl.int64)
    h = (batch_head % num_heads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, head_dim, EVEN_D)
    row_ok = offs_m < seq_len
    row_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_mask, other=0.0)
    grad_rows = b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :]
    do = tl.load(DO + grad_rows, mask=row_mask, other=0.0)
    rows = batch_head.to(tl.int64) * seq_len + offs_m
    row_term = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n0[None, :] * stride_kt + offs_d[:, None]  # (D, N)
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n0[None, :] * stride_vt + offs_d[:, None]  # (D, N)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + h) * 1.4426950408889634  # log2(e) as a literal: compiled Triton refuses float globals
        row_term += slope * tl.arange(0, BLOCK_M).to(tl.float32)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, start_m, BLOCK_N):
        dq = _dq_block(
            dq, q, do, row_term, delta, k_ptrs, v_ptrs, start_m, start_n, offs_m, offs_n0, slope, qk_scale, seq_len,
            stride_kt, stride_vt, d_ok, False, HAS_ALIBI, DOT_PRECISION,
        )
    for start_n in range(start_m, start_m + BLOCK_M, BLOCK_N):
        dq = _dq_block(
            dq, q, do, row_term, delta, k_ptrs, v_ptrs, start_m, start_n, offs_m, offs_n0, slope, qk_scale, seq_len,
            stride_kt, stride_vt, d_ok, True, HAS_ALIBI, DOT_PRECISION,
        )
    tl.store(DQ + grad_rows, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask)


# ---------------------------------------------------------------------- host functions


def _check_inputs(q, k, v, alibi_slopes):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"attention wants q, k, v of one shape (B, T, H, D), got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention wants one dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    if q.shape[-1] < 16:
        raise ValueError(f"attention needs head dim >= 16 (tl.dot's minimum), got {q.shape[-1]}")
    if alibi_slopes is not None and alibi_slopes.shape != (q.shape[2],):
        raise ValueError(f"alibi_slopes must be ({q.shape[2]},), got {tuple(alibi_slopes.shape)}")


def _launch_constants(q, alibi_slopes):
    head_dim = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(head_dim)
    slopes = (
        alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
        if alibi_slopes is not None
        else torch.zeros(1, dtype=torch.float32, device=q.device)
    )
    block_d = max(16, triton.next_power_of_2(head_dim))
    return dict(
        BLOCK_D=block_d,
        EVEN_D=block_d == head_dim,
        HAS_ALIBI=alibi_slopes is not None,
        # fp32 inputs are for tests; without "ieee" the GPU would round them to tf32.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    ), sm_scale, slopes


def attention_forward(q, k, v, alibi_slopes=None):
    """Returns (o, lse); o (B, T, H, D) contiguous, lse (B * H, T) fp32 in log2 units."""
    _check_inputs(q, k, v, alibi_slopes)
    batch, seq_len, num_heads, head_dim = q.shape
    constants, sm_scale, slopes = _launch_constants(q, alibi_slopes)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch * num_heads, seq_len, dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * num_heads)
    _attention_forward_kernel[grid](
        q, k, v, o, lse, slopes,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        num_heads, seq_len, head_dim, sm_scale * math.log2(math.e),
        **constants,
    )
    return o, lse


def attention_backward(do, q, k, v, o, lse, alibi_slopes=None):
    """Returns (dq, dk, dv), each (B, T, H, D) contiguous."""
    batch, seq_len, num_heads, head_dim = q.shape
    constants, sm_scale, slopes = _launch_constants(q, alibi_slopes)
    do = do.contiguous()
    delta = torch.empty_like(lse)
    delta_block = 16
    _attention_backward_delta_kernel[(triton.cdiv(seq_len, delta_block), batch * num_heads)](
        delta, o, do, num_heads, seq_len, head_dim, BLOCK_M=delta_block, BLOCK_D=constants["BLOCK_D"],
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    strides = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
    )
    scalars = (num_heads, seq_len, head_dim, sm_scale * math.log2(math.e), sm_scale)
    dkdv_grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_N"]), batch * num_heads)
    _attention_backward_dkdv_kernel[dkdv_grid](dk, dv, q, k, v, do, lse, delta, slopes, *strides, *scalars, **constants)
    dq_grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * num_heads)
    _attention_backward_dq_kernel[dq_grid](dq, q, k, v, do, lse, delta, slopes, *strides, *scalars, **constants)
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alibi_slopes):
        o, lse = attention_forward(q, k, v, alibi_slopes)
        ctx.save_for_backward(q, k, v, o, lse, alibi_slopes)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, alibi_slopes = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, alibi_slopes)
        return dq, dk, dv, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(D) + slope_h * (j - i)) v for (B, T, H, D) inputs.

    q, k, v may be strided views (last dim contiguous). alibi_slopes: (H,) per-head slopes,
    or None for no position term. Returns a contiguous (B, T, H, D) tensor in q's dtype.
    """
    return AttentionFunction.apply(q, k, v, alibi_slopes)


# ---------------------------------------------------------------------- as torch custom ops


@torch.library.custom_op("bloomrun::attention_forward", mutates_args=())
def _attention_forward_op(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Tensor | None) -> tuple[Tensor, Tensor]:
    """(o, lse): o (B, T, H, D) contiguous, lse (B * H, T) fp32; q, k, v may be strided views."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return attention_forward(q, k, v, alibi_slopes)


@_attention_forward_op.register_fake
def _(q, k, v, alibi_slopes):
    batch, seq_len, num_heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(batch * num_heads, seq_len, dtype=torch.float32)


@torch.library.custom_op("bloomrun::attention_backward", mutates_args=())
def _attention_backward_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, alibi_slopes: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), each (B, T, H, D) contiguous."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return attention_backward(do, q, k, v, o, lse, alibi_slopes)


@_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, alibi_slopes):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _attention_op_setup(ctx, inputs, output):
    q, k, v, alibi_slopes = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, alibi_slopes)
    ctx.mark_non_differentiable(lse)


def _attention_op_grad(ctx, do, _dlse):
    dq, dk, dv = _attention_backward_op(do, *ctx.saved_tensors)
    return dq, dk, dv, None


_attention_forward_op.register_autograd(_attention_op_grad, setup_context=_attention_op_setup)


def attention_custom_op(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Tensor | None = None) -> Tensor:
    """`attention` as torch.ops.bloomrun.attention_forward/_backward, for torch.compile."""
    return _attention_forward_op(q, k, v, alibi_slopes)[0]


def attention_reference(q, k, v, alibi_slopes=None):
    """Plain torch in fp32 with an explicit (T, T) bias and mask, cast back to q's dtype."""
    seq_len, head_dim = q.shape[1], q.shape[-1]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(head_dim)
    positions = torch.arange(seq_len, device=q.device)
    distance = (positions[None, :] - positions[:, None]).float()  # j - i
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.float().view(1, -1, 1, 1) * distance
    scores = scores.masked_fill(distance > 0, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf
    return out.transpose(1, 2).to(q.dtype)
