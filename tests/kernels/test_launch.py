"""The pieces the kernel files share (bloomrun/kernels/_launch.py): the bias activations'
row groups and the partial-row sum behind LayerNorm's dW/dB and the activations' dbias."""

import pytest
import torch

from bloomrun.kernels._launch import row_groups, sum_partial_rows
from tests.kernels.conftest import DEVICE, assert_close


@pytest.mark.parametrize("n_row_tiles, n_col_blocks, programs", [(1, 1, 4), (9, 1, 4), (2048, 8, 264), (7, 3, 2)])
def test_row_groups_cover_every_tile_once(n_row_tiles, n_col_blocks, programs):
    groups = row_groups(n_row_tiles, n_col_blocks, programs)
    assert (groups.count - 1) * groups.tiles_each < n_row_tiles <= groups.count * groups.tiles_each
    assert groups.count <= -(-programs // n_col_blocks)  # about `programs` in all


@pytest.mark.parametrize("num_partials", [1, 2], ids=["one", "paired"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sum_partial_rows_adds_every_row(dtype, num_partials):
    # More partial rows than one reduction step holds, and a column tail.
    partials = [torch.randn(70, 130, device=DEVICE) for _ in range(num_partials)]
    outs = sum_partial_rows(dtype, *partials)
    assert len(outs) == num_partials
    for i, (out, partial) in enumerate(zip(outs, partials)):
        assert out.dtype == dtype
        assert_close(f"sum {i}", out, partial.sum(0), dtype)

