"""What every kernel file needs to launch: interpreter detection and launch configurations.

Triton's interpreter (TRITON_INTERPRET=1, the CPU test suite) cannot time kernels, so
`@triton.autotune` with more than one config fails there; interpreted runs get one small
config. On a GPU the tests set BLOOMRUN_TRITON_AUTOTUNE=0 to skip the tuning sweep (each
config is a compilation), and training and the benchmarks tune over the full list.
"""

from __future__ import annotations

import functools
import os

import torch
import triton


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
