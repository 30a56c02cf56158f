"""Shared fixtures of the kernel tests: devices, dtypes, tolerance rows and poisoned buffers.

On the CPU the kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET before anything imports them); there bf16 `tl.dot` returns garbage, so
bf16 runs only where CUDA is present, together with the full-size shapes.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.utils._device as torch_device_module

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

# Per dtype: elementwise (atol, rtol) against an fp32 reference on the same (upcast) inputs,
# and the bound on ||out - ref|| / ||ref|| (Frobenius), which stays tight on long rows
# where a few elements may sit near the elementwise bound.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4, rel_l2=1e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2, rel_l2=3e-3),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2, rel_l2=2e-2),
}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Checks `actual` (any dtype) against the fp32 `expected` with `dtype`'s tolerance row."""
    tol = TOLERANCES[dtype]
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten poisoned element?)"
    # A reference that is zero up to rounding (dq of a one-token sequence) has no scale to be
    # relative to; the elementwise atol below covers it.
    if expected.norm() > tol["atol"] * expected.numel() ** 0.5:
        rel_l2 = ((actual - expected).norm() / expected.norm()).item()
        assert rel_l2 <= tol["rel_l2"], f"{name}: relative L2 error {rel_l2:.2e} > {tol['rel_l2']:.0e}"
    torch.testing.assert_close(actual, expected, atol=tol["atol"], rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")


# torch caches its list of tensor constructors (torch.empty among them) the first time a
# `with torch.device(...)` block runs; torch.compile opens one. Were that first time inside a
# test below, the cache would keep the poisoning lambda instead of torch.empty, and every
# later `with torch.device("meta")` would quietly allocate real memory (a 7B model on the CPU).
torch_device_module._device_constructors()


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Every torch.empty / empty_like during a kernel test returns a NaN-filled buffer.

    The kernels allocate their outputs (and partial-sum buffers) with these, so an element a
    kernel forgets to write stays NaN and fails `assert_close`'s finiteness check.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.fill_(math.nan)
        if t.dtype != torch.bool:
            return t.fill_(torch.iinfo(t.dtype).max)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A different seed per test (fresh random inputs) that is still reproducible by name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def upcast_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().requires_grad_(True)
