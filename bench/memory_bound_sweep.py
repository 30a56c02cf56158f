"""Where the memory-bound kernels' time goes, and whether their launch rule fits the card.

Per kernel, the device time of each launch (torch.profiler over ten forward+backward calls
at the benchmark shapes), then forward and forward+backward times replayed from CUDA graphs
(no host launch cost) while sweeping the knobs of the launch rules in layer_norm.py and
_launch.py, so the defaults can be confirmed or replaced by what the card prefers.
GPU only:  python -m bench.memory_bound_sweep
"""

import torch

from bench.common import graph_time_ms
from bloomrun.kernels import _launch as launch
from bloomrun.kernels import bias_gelu as gelu
from bloomrun.kernels import bias_swiglu as swiglu
from bloomrun.kernels import layer_norm as ln

dev, bf16 = "cuda", torch.bfloat16


def cases():
    x_ln = torch.randn(8192, 2048, device=dev, dtype=bf16, requires_grad=True)
    w = torch.ones(2048, device=dev, dtype=bf16, requires_grad=True)
    b = torch.zeros(2048, device=dev, dtype=bf16, requires_grad=True)
    x_g = torch.randn(8192, 8192, device=dev, dtype=bf16, requires_grad=True)
    b_g = torch.randn(8192, device=dev, dtype=bf16, requires_grad=True)
    x_s = torch.randn(8192, 2 * 5440, device=dev, dtype=bf16, requires_grad=True)
    b_s = torch.randn(2 * 5440, device=dev, dtype=bf16, requires_grad=True)
    return {
        "layer_norm": (lambda: ln.layer_norm(x_ln, w, b, 1e-5), (x_ln, w, b), torch.randn_like(x_ln)),
        "bias_gelu": (lambda: gelu.bias_gelu(x_g, b_g), (x_g, b_g), torch.randn_like(x_g)),
        "bias_swiglu": (lambda: swiglu.bias_swiglu(x_s, b_s), (x_s, b_s), torch.randn(8192, 5440, device=dev, dtype=bf16)),
    }


def timings(fn, inputs, grad):
    with torch.no_grad():
        fwd = graph_time_ms(fn)
    both = graph_time_ms(lambda: torch.autograd.grad(fn(), inputs, grad))
    return f"fwd {fwd:.4f} ms  fwd+bwd {both:.4f} ms (graph replays)"


def per_kernel(name, fn, inputs, grad):
    for _ in range(3):
        torch.autograd.grad(fn(), inputs, grad)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            torch.autograd.grad(fn(), inputs, grad)
        torch.cuda.synchronize()
    print(f"--- {name}: device time per launch (10 fwd+bwd)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


def main():
    all_cases = cases()
    for name, case in all_cases.items():
        per_kernel(name, *case)
        print(f"{name} defaults: {timings(*case)}", flush=True)
    # LayerNorm: backward rows per step (tile bytes) x programs per SM (16 warps / warps).
    for tile_bytes in (4096, 8192, 16384):
        for warps_per_sm in (8, 16, 32):
            ln._BACKWARD_TILE_BYTES, ln._WARPS_PER_SM = tile_bytes, warps_per_sm
            print(f"layer_norm bwd tile {tile_bytes} B, {warps_per_sm} warps/SM: {timings(*all_cases['layer_norm'])}", flush=True)
    ln._BACKWARD_TILE_BYTES, ln._WARPS_PER_SM = 8192, 16
    for tile_bytes in (2048, 8192):
        ln._FORWARD_TILE_BYTES = tile_bytes
        print(f"layer_norm fwd tile {tile_bytes} B: {timings(*all_cases['layer_norm'])}", flush=True)
    ln._FORWARD_TILE_BYTES = 4096
    # Activations: tile values x programs per SM for the persistent backward.
    for module, name in ((gelu, "bias_gelu"), (swiglu, "bias_swiglu")):
        for tile_values in (2048, 4096, 8192):
            launch._TILE_VALUES = tile_values
            launch.tile_for.cache_clear()
            for per_sm in (1, 2, 3, 4):
                module._BACKWARD_PROGRAMS_PER_SM = per_sm
                print(f"{name} tile {tile_values} values, {per_sm} programs/SM: {timings(*all_cases[name])}", flush=True)
        launch._TILE_VALUES = 4096
        launch.tile_for.cache_clear()
    gelu._BACKWARD_PROGRAMS_PER_SM, swiglu._BACKWARD_PROGRAMS_PER_SM = 3, 2


if __name__ == "__main__":
    main()
