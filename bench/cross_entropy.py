"""Claim: linear + cross-entropy, 8192 tokens, hidden 2048, vocab 250,880, bf16:
<= 55 ms forward+backward at <= 3.5 GB peak.

Baselines in the same process: torch (F.linear to full logits, fp32 cross-entropy) and
Liger-Kernel's fused linear cross-entropy (when installed). Peak memory counts everything
allocated while the step runs, the 1 GB weight and the inputs included (inputs_gb says
how much of it the inputs are); the reference gradients of the agreement check live on the
host so they do not count.
    python -m bench.cross_entropy --out results/cross_entropy.json
"""

from __future__ import annotations

import gc

import torch

from bench.common import parse_args, peak_gb, report, time_ms
from bloomrun.kernels.cross_entropy import linear_cross_entropy

TOKENS, HIDDEN, VOCAB = 8192, 2048, 250880


def main() -> None:
    args = parse_args(__doc__)
    device, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN, device=device) / HIDDEN**0.5).to(dtype).requires_grad_(True)
    targets = torch.randint(0, VOCAB, (TOKENS,), device=device)
    targets[::97] = -100

    def torch_ce():
        logits = hidden @ weight.t()
        return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100)

    implementations = {"torch": torch_ce, "ours": lambda: linear_cross_entropy(hidden, weight, targets)}
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        implementations["liger"] = lambda: LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets)[0]
    except Exception as error:
        print("Liger-Kernel unavailable:", repr(error)[:200])

    results = {"shape": dict(tokens=TOKENS, hidden=HIDDEN, vocab=VOCAB, dtype="bf16")}
    reference = None
    for name, fn in implementations.items():
        try:
            def step():
                loss = fn()
                grads = torch.autograd.grad(loss, (hidden, weight))
                return loss, grads

            # Peak first, while only the inputs are allocated: the fp32 reference gradients
            # kept for the agreement check below are 2.1 GB and must not count.
            gc.collect()
            torch.cuda.empty_cache()
            resident = torch.cuda.memory_allocated() / 1e9
            peak = peak_gb(step)
            loss, grads = step()
            if reference is None:
                reference = (loss.item(), grads[0].float().cpu(), grads[1].float().cpu())
            agreement = dict(
                loss_abs_diff_vs_torch=abs(loss.item() - reference[0]),
                dhidden_rel_l2_vs_torch=((grads[0].float().cpu() - reference[1]).norm() / reference[1].norm()).item(),
                dweight_rel_l2_vs_torch=((grads[1].float().cpu() - reference[2]).norm() / reference[2].norm()).item(),
            )
            del loss, grads
            results[name] = dict(forward_backward_ms=time_ms(step, warmup=2, iters=10), peak_gb=peak,
                                 inputs_gb=resident, **agreement)
        except Exception as error:
            results[name] = dict(error=repr(error)[:300])
        gc.collect()
        torch.cuda.empty_cache()
        print(name, results[name], flush=True)
    for name in ("torch", "liger"):
        if "forward_backward_ms" in results.get(name, {}) and "forward_backward_ms" in results["ours"]:
            results[f"speedup_vs_{name}"] = results[name]["forward_backward_ms"] / results["ours"]["forward_backward_ms"]
    results["matmul_floor_ms"] = 3 * 2 * TOKENS * HIDDEN * VOCAB / 1e9 / 800  # at 800 TFLOP/s
    results["targets"] = dict(forward_backward_ms=55, peak_gb=3.5)
    report("cross_entropy", results, args.out)


if __name__ == "__main__":
    main()
