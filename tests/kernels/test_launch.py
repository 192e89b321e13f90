"""Launch sizing: how long sequences are cut into splits, and grids within CUDA's limits."""

import pytest

from lava_sglang.kernels.launch import checked_grid, split_size


def test_one_long_sequence_is_cut_to_fill_the_device():
    # Batch 1, 8 KV heads, 6554 kept keys each (32K document at 0.2), 528 programs wanted.
    chunk = split_size(8 * 6554, 6554, programs=528, block=64)
    assert chunk % 64 == 0
    assert 8 * -(-6554 // chunk) >= 528 / 2  # within a factor 2 of the wanted programs
    assert -(-6554 // chunk) <= 64


def test_a_large_batch_is_not_split():
    # 64 requests x 8 heads x 819 keys already give far more programs than wanted.
    assert split_size(512 * 819, 819, programs=528, block=64) >= 819


def test_chunks_never_go_below_a_block_nor_above_the_split_cap():
    assert split_size(10, 10, programs=528, block=64) == 64
    # One 32K sequence next to tiny ones: at most 64 chunks for it, whatever the programs.
    chunk = split_size(32768 + 7, 32768, programs=100000, block=64)
    assert -(-32768 // chunk) <= 64


def test_a_grid_beyond_cudas_limits_is_refused_by_name():
    assert checked_grid(2**31 - 1, 65535, 65535) == (2**31 - 1, 65535, 65535)
    for grid, axis in (((2**31, 1), "x"), ((1, 65536), "y"), ((1, 1, 65536), "z")):
        with pytest.raises(ValueError, match=f"along the grid's {axis} axis"):
            checked_grid(*grid)
