"""Compile every tuned config of the Triton kernels for sm_90a on this machine (no GPU
needed) and report registers, spills and shared memory from ptxas, so configs that spill
can be dropped before any GPU time is spent.
    python -m bench.compile_report [kernel-name-substring]
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bloomrun.kernels import _launch as launch_module
from bloomrun.kernels import attention as attention_module
from bloomrun.kernels import bias_gelu as gelu_module
from bloomrun.kernels import bias_swiglu as swiglu_module
from bloomrun.kernels import layer_norm as ln_module

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
INT_ARGS = re.compile(r"^(stride_|num_|seq_len|head_dim|n_rows|n_cols|n_partial|tiles_per_group|half$)")


def signature(fn, pointer_types: dict[str, str], scalars: dict[str, str]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in pointer_types:
            sig[name] = pointer_types[name]
        elif name in scalars:
            sig[name] = scalars[name]
        elif INT_ARGS.match(name):
            sig[name] = "i32"
        else:
            sig[name] = "constexpr"
    return sig


def ptxas_report(ptx: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([str(PTXAS), "-v", "-arch=sm_90a", str(path), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return f"regs={regs.group(1) if regs else '?'} spill_stores={spills.group(1) if spills else '?'}"


def report(kernel, pointer_types, scalars, constants, configs=None) -> None:
    """Every config of an autotuned kernel, or `configs` for one launched with a rule."""
    fn = kernel.fn if configs is None else kernel
    sig = signature(fn, pointer_types, scalars)
    for config in configs or kernel.configs:
        consts = dict(constants, **config.kwargs)
        try:
            # As a real launch at the benchmark shapes specialises them: every pointer and
            # integer argument divisible by 16.
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                     if sig[n].startswith("*") or sig[n] == "i32"}
            compiled = triton.compile(
                ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
            )
            info = f"{ptxas_report(compiled.asm['ptx'])} smem={compiled.metadata.shared}"
        except Exception as error:  # out of shared memory and the like
            info = f"FAILED {type(error).__name__}: {str(error)[-600:]}"
        print(f"{fn.__name__:40s} {consts} warps={config.num_warps} stages={config.num_stages}: {info}", flush=True)


def main() -> None:
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    attention_constants = dict(BLOCK_D=128, HAS_ALIBI=True, DOT_PRECISION="tf32")
    bf16_qkv = {n: "*bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    fp32 = {n: "*fp32" for n in ("LSE", "Slopes", "Delta")}
    scalars = {"qk_scale": "fp32", "sm_scale": "fp32", "eps": "fp32"}
    kernels = [
        (attention_module._attention_forward_kernel, {**bf16_qkv, **fp32}, attention_constants),
        (attention_module._attention_backward_dkdv_kernel, {**bf16_qkv, **fp32}, attention_constants),
        (attention_module._attention_backward_dq_kernel, {**bf16_qkv, **fp32}, attention_constants),
    ]
    # Kernels launched with a rule instead of the autotuner: the rule's config at the
    # benchmark shapes (LayerNorm 2048 bf16, GELU F 8192, SwiGLU F 5440).
    ln_forward = ln_module.row_tile(2048, 2, ln_module._FORWARD_TILE_BYTES)
    ln_backward = ln_module.row_tile(2048, 2, ln_module._BACKWARD_TILE_BYTES)
    gelu, swiglu = launch_module.tile_for(8192), launch_module.tile_for(5440)
    bf16_activation = {"Y": "*bf16", "X": "*bf16", "DX": "*bf16", "DY": "*bf16", "Bias": "*bf16", "DBias_partial": "*fp32"}
    ruled = [
        (ln_module._layer_norm_forward_kernel,
         {"Y": "*bf16", "X": "*bf16", "W": "*bf16", "B": "*bf16", "Mean": "*fp32", "Rstd": "*fp32"},
         dict(BLOCK=ln_forward.block, ROWS=ln_forward.rows), ln_forward.num_warps),
        (ln_module._layer_norm_backward_kernel,
         {"DX": "*bf16", "DY": "*bf16", "X": "*bf16", "W": "*bf16", "Mean": "*fp32", "Rstd": "*fp32",
          "DW_partial": "*fp32", "DB_partial": "*fp32"},
         dict(BLOCK=ln_backward.block, ROWS=ln_backward.rows), ln_backward.num_warps),
        (gelu_module._bias_gelu_forward_kernel, bf16_activation, dict(BLOCK_M=gelu.rows, BLOCK_F=gelu.block_f), gelu.num_warps),
        (gelu_module._bias_gelu_backward_kernel, bf16_activation, dict(BLOCK_M=gelu.rows, BLOCK_F=gelu.block_f), gelu.num_warps),
        # The partial-row sum, paired as LayerNorm launches it and alone as the activations do.
        (launch_module._sum_partial_rows_kernel,
         {"Out": "*bf16", "Partial": "*fp32", "Out2": "*bf16", "Partial2": "*fp32"},
         dict(PAIRED=True, ROWS=launch_module._REDUCE_ROWS, BLOCK=launch_module._REDUCE_BLOCK), launch_module._REDUCE_WARPS),
        (launch_module._sum_partial_rows_kernel,
         {"Out": "*bf16", "Partial": "*fp32", "Out2": "*bf16", "Partial2": "*fp32"},
         dict(PAIRED=False, ROWS=launch_module._REDUCE_ROWS, BLOCK=launch_module._REDUCE_BLOCK), launch_module._REDUCE_WARPS),
        (swiglu_module._bias_swiglu_forward_kernel, bf16_activation,
         dict(BLOCK_M=swiglu.rows, BLOCK_F=swiglu.block_f), swiglu.num_warps),
        (swiglu_module._bias_swiglu_backward_kernel, bf16_activation,
         dict(BLOCK_M=swiglu.rows, BLOCK_F=swiglu.block_f), swiglu.num_warps),
    ]
    for kernel, pointers, constants in kernels:
        if only in kernel.fn.__name__:
            report(kernel, pointers, scalars, constants)
    for kernel, pointers, constants, num_warps in ruled:
        if only in kernel.__name__:
            report(kernel, pointers, scalars, {}, [triton.Config(constants, num_warps=num_warps)])


if __name__ == "__main__":
    main()
