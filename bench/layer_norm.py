"""Claim: LayerNorm 8192 x 2048 bf16: forward >= 2.5 TB/s, forward+backward <= 0.09 ms.

Baselines in the same process: torch's LayerNorm, Liger-Kernel's (when installed), and a
device-to-device copy of the same bytes as the bandwidth ceiling. Bytes counted: forward
reads x and writes y (plus the 8 bytes of per-row statistics ours stores); inputs rotate
among 4 copies (4 x 32 MB is above the 50 MB L2).
    python -m bench.layer_norm --out results/layer_norm.json
"""

from __future__ import annotations

import torch

from bench.common import Rotating, graph_time_ms, parse_args, report, time_ms
from bloomrun.kernels import layer_norm as ln
from bloomrun.kernels.layer_norm import layer_norm

ROWS, COLS = 8192, 2048


def main() -> None:
    args = parse_args(__doc__)
    device, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    weight = (1 + 0.1 * torch.randn(COLS, device=device)).to(dtype).requires_grad_(True)
    bias = (0.1 * torch.randn(COLS, device=device)).to(dtype).requires_grad_(True)
    inputs = Rotating(lambda: (
        torch.randn(ROWS, COLS, device=device, dtype=dtype).requires_grad_(True),
        torch.randn(ROWS, COLS, device=device, dtype=dtype),
    ))
    io_bytes = 2 * ROWS * COLS * 2  # read x, write y

    def torch_ln(x):
        return torch.nn.functional.layer_norm(x, (COLS,), weight, bias, 1e-5)

    implementations = {"torch": torch_ln, "ours": lambda x: layer_norm(x, weight, bias, 1e-5)}
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        implementations["liger"] = lambda x: LigerLayerNormFunction.apply(x, weight, bias, 1e-5)
    except Exception as error:
        print("Liger-Kernel unavailable:", repr(error)[:200])

    results = {"shape": dict(rows=ROWS, cols=COLS, dtype="bf16")}
    copy_src = Rotating(lambda: torch.randn(ROWS, COLS, device=device, dtype=dtype))
    copy_dst = torch.empty(ROWS, COLS, device=device, dtype=dtype)
    copy_ms = time_ms(lambda: copy_dst.copy_(copy_src.next()), iters=100)
    results["copy"] = dict(ms=copy_ms, tb_per_s=io_bytes / copy_ms / 1e9)

    x0, dy0 = inputs.sets[0]
    expected = torch.nn.functional.layer_norm(x0.float(), (COLS,), weight.float(), bias.float(), 1e-5)
    for name, fn in implementations.items():
        try:
            with torch.no_grad():
                out = fn(x0).float()
            error = (out - expected).abs().max().item()
            with torch.no_grad():
                forward_ms = time_ms(lambda: fn(inputs.next()[0]), iters=100)

            def forward_backward():
                x, dy = inputs.next()
                torch.autograd.grad(fn(x), (x, weight, bias), dy)

            both_ms = time_ms(forward_backward, iters=100)
            # The same calls replayed from a CUDA graph: device time without launch cost.
            with torch.no_grad():
                forward_graph_ms = graph_time_ms(lambda: fn(inputs.next()[0]))
            results[name] = dict(
                forward_ms=forward_ms, forward_tb_per_s=io_bytes / forward_ms / 1e9,
                forward_backward_ms=both_ms, max_abs_error_vs_fp32=error,
                forward_graph_ms=forward_graph_ms,
                forward_graph_tb_per_s=io_bytes / forward_graph_ms / 1e9 if forward_graph_ms else None,
                forward_backward_graph_ms=graph_time_ms(forward_backward),
            )
        except Exception as error:
            results[name] = dict(error=repr(error)[:300])
        print(name, results[name], flush=True)
    for name in ("torch", "liger"):
        if "forward_backward_ms" in results.get(name, {}) and "forward_backward_ms" in results["ours"]:
            results[f"speedup_fwd_bwd_vs_{name}"] = results[name]["forward_backward_ms"] / results["ours"]["forward_backward_ms"]
            results[f"speedup_fwd_vs_{name}"] = results[name]["forward_ms"] / results["ours"]["forward_ms"]
    results["targets"] = dict(forward_tb_per_s=2.5, forward_backward_ms=0.09)
    results["configs"] = dict(forward=str(ln.row_tile(2048, 2, ln._FORWARD_TILE_BYTES)),
                              backward=str(ln.row_tile(2048, 2, ln._BACKWARD_TILE_BYTES)))
    report("layer_norm", results, args.out)


if __name__ == "__main__":
    main()
