"""Claim: ALiBi causal attention, B=4 H=16 T=2048 D=128 bf16: <= 0.95 ms fwd+bwd, <= 0.28 ms fwd.

Baselines in the same process: eager torch with an ALiBi bias tensor, SDPA with the same
bias tensor, torch.compile'd FlexAttention with an ALiBi score_mod and a causal block mask,
and SDPA flash without ALiBi (the speed of attention with no bias at all).
Ours takes q, k, v as strided views of the fused (B, T, H, 3, D) QKV buffer, as the model
passes them; the baselines get contiguous (B, H, T, D) tensors, their preferred layout.
    python -m bench.attention --out results/attention.json
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.common import best_config, parse_args, report, time_ms
from bloomrun.kernels.attention import (
    attention,
    _attention_backward_dkdv_kernel,
    _attention_backward_dq_kernel,
    _attention_forward_kernel,
)
from bloomrun.trainer.model.positions import alibi_slopes

BATCH, HEADS, SEQ, HEAD_DIM = 4, 16, 2048, 128


def causal_flops(forward_and_backward: bool) -> float:
    forward = 4 * BATCH * HEADS * SEQ * SEQ * HEAD_DIM / 2  # two matmuls, half the square
    return forward * (3.5 if forward_and_backward else 1.0)  # backward: 5 matmuls vs 2


def main() -> None:
    args = parse_args(__doc__)
    device, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    slopes = alibi_slopes(HEADS, device)
    qkv = torch.randn(BATCH, SEQ, HEADS, 3, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
    q, k, v = qkv.unbind(dim=3)
    qh, kh, vh = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
    grad_out = torch.randn(BATCH, SEQ, HEADS, HEAD_DIM, device=device, dtype=dtype)
    grad_out_h = grad_out.transpose(1, 2).contiguous()
    positions = torch.arange(SEQ, device=device)
    distance = (positions[None, :] - positions[:, None]).float()  # j - i
    bias = (slopes[:, None, None] * distance).masked_fill(distance > 0, -math.inf).to(dtype)  # (H, T, T)
    scale = 1 / math.sqrt(HEAD_DIM)

    def eager(q_, k_, v_):
        scores = (q_ @ k_.transpose(-1, -2)) * scale + bias
        return torch.softmax(scores.float(), dim=-1).to(dtype) @ v_

    def sdpa_bias(q_, k_, v_):
        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=bias)

    def sdpa_flash_no_alibi(q_, k_, v_):
        return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def alibi_score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    causal = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, SEQ, SEQ, device=device)
    compiled_flex = torch.compile(flex_attention)

    def flex(q_, k_, v_):
        return compiled_flex(q_, k_, v_, score_mod=alibi_score_mod, block_mask=causal)

    def ours(q_, k_, v_):
        return attention(q_, k_, v_, slopes)

    results = {"shape": dict(batch=BATCH, heads=HEADS, seq=SEQ, head_dim=HEAD_DIM, dtype="bf16")}
    # Correctness at the benchmark shape, against FlexAttention (fp32 softmax inside).
    with torch.no_grad():
        reference = flex(qh, kh, vh).transpose(1, 2).float()
        mine = ours(q, k, v).float()
        results["max_abs_error_vs_flex"] = (mine - reference).abs().max().item()
        results["rel_l2_error_vs_flex"] = ((mine - reference).norm() / reference.norm()).item()

    cases = {
        "eager_alibi": (eager, (qh, kh, vh), grad_out_h),
        "sdpa_alibi_bias": (sdpa_bias, (qh, kh, vh), grad_out_h),
        "flex_compiled_alibi": (flex, (qh, kh, vh), grad_out_h),
        "sdpa_flash_no_alibi": (sdpa_flash_no_alibi, (qh, kh, vh), grad_out_h),
        "ours_alibi": (ours, (q, k, v), grad_out),
        "ours_no_alibi": (lambda a, b_, c: attention(a, b_, c, None), (q, k, v), grad_out),
    }
    for name, (fn, inputs, grad) in cases.items():
        try:
            with torch.no_grad():
                forward_ms = time_ms(lambda: fn(*inputs))

            def forward_backward():
                out = fn(*inputs)
                torch.autograd.grad(out, inputs, grad)

            both_ms = time_ms(forward_backward)
            results[name] = dict(
                forward_ms=forward_ms,
                forward_backward_ms=both_ms,
                forward_tflops=causal_flops(False) / forward_ms / 1e9,
                forward_backward_tflops=causal_flops(True) / both_ms / 1e9,
            )
        except Exception as error:  # a baseline that fails is reported, not fatal
            results[name] = dict(error=repr(error)[:300])
        print(name, results[name], flush=True)
    ours_both = results["ours_alibi"].get("forward_backward_ms")
    if ours_both:
        for name in ("eager_alibi", "sdpa_alibi_bias", "flex_compiled_alibi", "sdpa_flash_no_alibi"):
            if "forward_backward_ms" in results[name]:
                results[f"speedup_fwd_bwd_vs_{name}"] = results[name]["forward_backward_ms"] / ours_both
                results[f"speedup_fwd_vs_{name}"] = results[name]["forward_ms"] / results["ours_alibi"]["forward_ms"]
    results["targets"] = dict(forward_ms=0.28, forward_backward_ms=0.95)
    results["configs"] = dict(
        forward=best_config(_attention_forward_kernel),
        backward_dkdv=best_config(_attention_backward_dkdv_kernel),
        backward_dq=best_config(_attention_backward_dq_kernel),
    )
    report("attention", results, args.out)


if __name__ == "__main__":
    main()
