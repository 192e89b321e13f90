"""Window statistics of one layer read in place from SGLang's KV pool (lava.md, "Per-layer score").

What a window policy needs from a layer of an n-token document that only the layer's keys
give: the mean attention the last w queries pay each of the m = n - w prefix keys, reduced
over the G query heads of a KV group (max for LAVa, mean for the SnapKV family), and, if
asked, the largest value L1 norm per KV head (vbar). The torch reference
(`lava_sglang.policy.scores`) materialises the [Hq, w, n] attention of the document; the
kernels never do. They read keys and values through the sequence's slot indices straight
from the pool buffers ([pool_size, Hkv, d] for one layer, as SGLang's MHA token pool holds
them), flash-style in two passes:

1. `_window_row_max_sum_kernel`: per window query row, the running max and sum of exp of its
   logits over all n keys with the causal mask inside the window, split over keys so that a
   single document fills the GPU; the splits are combined into the row's log-sum-exp in
   torch ([splits, Hq, w], small).
2. `_window_column_mass_kernel`: per block of prefix keys, the probabilities
   exp(logit - lse) summed over the window rows of each query head, divided by w, reduced
   over the group; and the block's largest value L1 norm.

Memory is O(splits * Hq * w + Hkv * m). The rest of the scoring (pooling, the vbar scale,
the forced sinks, the entropy) is the policy's, from this mass:
`policy.scores_from_mass(statistics.mass, values)` equals `policy.layer_scores` of the
gathered rows up to fp32 summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lava_sglang.checks import is_int
from lava_sglang.kernels import launch
from lava_sglang.policy import scores as score_ops

BLOCK_KEYS = 64
MAX_BLOCK_ROWS = 128


@dataclass(frozen=True)
class WindowStatistics:
    """One layer's window statistics.

    mass: [Hkv, m] fp32, the window's mean attention on each prefix key, reduced over each
        query group (`policy.scores.window_attention_mass`).
    value_norm: [Hkv] fp32 vbar, the largest value L1 norm over prefix tokens
        (`policy.scores.value_norm_scale`), None if not asked.
    """

    mass: torch.Tensor
    value_norm: torch.Tensor | None


@triton.jit
def _window_row_max_sum_kernel(
    q_ptr, k_ptr, slots_ptr, split_max_ptr, split_sum_ptr,
    stride_qh, stride_qw, stride_kslot, stride_khead,
    num_keys, prefix_len, window, group, keys_per_split, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    kv_head = tl.program_id(0)
    row_tile = tl.program_id(1)
    split = tl.program_id(2)
    # Rows of the program: the G * w window queries of the KV group, query head major.
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < group * window
    q_head = kv_head * group + rows // window
    q_pos = rows % window
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    q = tl.load(q_ptr + q_head[:, None] * stride_qh + q_pos[:, None] * stride_qw + dims[None, :],
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, num_keys)
    for key_start in range(start, end, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_valid = keys < end
        slots = tl.load(slots_ptr + keys, mask=key_valid, other=0).to(tl.int64)
        k = tl.load(k_ptr + slots[:, None] * stride_kslot + kv_head * stride_khead + dims[None, :],
                    mask=key_valid[:, None] & dim_valid[None, :], other=0.0)
        logits = launch.dot(q, tl.trans(k)) * sm_scale
        # Window query r sits at position prefix_len + r: it sees keys up to and including it.
        visible = key_valid[None, :] & (keys[None, :] <= prefix_len + q_pos[:, None])
        logits = tl.where(visible, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        # A split that starts inside the window can hide every key of a block from a row.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        row_max = new_max
    num_q_heads = tl.num_programs(0) * group
    offsets = (split * num_q_heads + q_head) * window + q_pos
    tl.store(split_max_ptr + offsets, row_max, mask=row_valid)
    tl.store(split_sum_ptr + offsets, row_sum, mask=row_valid)


@triton.jit
def _window_column_mass_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, row_lse_ptr, mass_ptr, block_value_norm_ptr,
    stride_qh, stride_qw, stride_kslot, stride_khead, stride_vslot, stride_vhead,
    prefix_len, window, group, sm_scale,
    HEAD_DIM: tl.constexpr, GQA_MAX: tl.constexpr, VALUE_NORM: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    kv_head = tl.program_id(0)
    key_block = tl.program_id(1)
    keys = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_valid = keys < prefix_len
    slots = tl.load(slots_ptr + keys, mask=key_valid, other=0).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    k = tl.load(k_ptr + slots[:, None] * stride_kslot + kv_head * stride_khead + dims[None, :],
                mask=key_valid[:, None] & dim_valid[None, :], other=0.0)

    # Prefix keys are visible to every window query: no mask beyond the padding. Mass >= 0,
    # so 0 is the neutral start of both the max and the sum. The window's rows come in tiles
    # of at most BLOCK_W (a --kv-window of 1,024 would not fit one tile in shared memory).
    reduced = tl.zeros([BLOCK_N], tl.float32)
    for member in range(group):
        q_head = kv_head * group + member
        mass = tl.zeros([BLOCK_N], tl.float32)
        for row_start in range(0, window, BLOCK_W):
            q_pos = row_start + tl.arange(0, BLOCK_W)
            pos_valid = q_pos < window
            q = tl.load(q_ptr + q_head * stride_qh + q_pos[:, None] * stride_qw + dims[None, :],
                        mask=pos_valid[:, None] & dim_valid[None, :], other=0.0)
            # Padded rows get lse = +inf, so their probabilities are exactly 0.
            lse = tl.load(row_lse_ptr + q_head * window + q_pos, mask=pos_valid, other=float("inf"))
            logits = launch.dot(q, tl.trans(k)) * sm_scale
            mass += tl.sum(tl.exp(logits - lse[:, None]), axis=0)
        mass = mass / window
        if GQA_MAX:
            reduced = tl.maximum(reduced, mass)
        else:
            reduced += mass
    if not GQA_MAX:
        reduced = reduced / group
    tl.store(mass_ptr + kv_head * prefix_len + keys, reduced, mask=key_valid)

    if VALUE_NORM:
        v = tl.load(v_ptr + slots[:, None] * stride_vslot + kv_head * stride_vhead + dims[None, :],
                    mask=key_valid[:, None] & dim_valid[None, :], other=0.0)
        norms = tl.sum(tl.abs(v.to(tl.float32)), axis=1)  # padded keys read zeros: norm 0
        tl.store(block_value_norm_ptr + kv_head * tl.num_programs(1) + key_block, tl.max(norms, axis=0))


def _check_inputs(q_window, k_buffer, v_buffer, slots, gqa_reduce) -> tuple[int, int]:
    launch.check_tensor("q_window", q_window, 3, launch.FLOAT_DTYPES)
    launch.check_tensor("k_buffer", k_buffer, 3, launch.FLOAT_DTYPES)
    launch.check_tensor("v_buffer", v_buffer, 3, launch.FLOAT_DTYPES)
    launch.check_tensor("slots", slots, 1, launch.INDEX_DTYPES)
    launch.check_same_device(q_window=q_window, k_buffer=k_buffer, v_buffer=v_buffer, slots=slots)
    if k_buffer.shape != v_buffer.shape:
        raise ValueError(f"k_buffer and v_buffer must have one shape [pool_size, Hkv, d], got "
                         f"{list(k_buffer.shape)} and {list(v_buffer.shape)}")
    if not q_window.dtype == k_buffer.dtype == v_buffer.dtype:
        raise ValueError(f"q_window, k_buffer, v_buffer must have one dtype, got "
                         f"{q_window.dtype}, {k_buffer.dtype}, {v_buffer.dtype}")
    num_q_heads, window, head_dim = q_window.shape
    pool_size, num_kv_heads, kv_dim = k_buffer.shape
    if head_dim != kv_dim:
        raise ValueError(f"q_window has head dim {head_dim}, the pool buffers {kv_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q_window has Hq={num_q_heads}, not a multiple of Hkv={num_kv_heads}")
    if window < 1 or slots.numel() <= window:
        raise ValueError(f"need 1 <= w < n to have a prefix to score, got w={window}, n={slots.numel()}")
    for name, tensor in (("q_window", q_window), ("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        launch.check_rows_contiguous(name, tensor)
    score_ops.check_gqa_reduce(gqa_reduce)
    launch.check_index_range("slots", slots, pool_size)
    return num_kv_heads, num_q_heads // num_kv_heads


def window_statistics(
    q_window: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    slots: torch.Tensor,
    *,
    gqa_reduce: str = "max",
    with_value_norm: bool = False,
    keys_per_split: int | None = None,
) -> WindowStatistics:
    """One layer's window statistics, reading keys and values in place from the pool.

    q_window: [Hq, w, d] post-RoPE queries of the last w tokens of the document.
    k_buffer, v_buffer: [pool_size, Hkv, d] the layer's pool buffers (same dtype as q_window).
    slots: int64 (or int32) [n], the document's pool slots in token order; n > w.
    gqa_reduce: "max" (LAVa) or "mean" (SnapKV family); with_value_norm: compute vbar too.
    keys_per_split: keys per program of the first pass (default: enough splits to fill the
    device; tests set it small to exercise the split combination).
    Synchronises with the device once (the slot range check).
    """
    num_kv_heads, group = _check_inputs(q_window, k_buffer, v_buffer, slots, gqa_reduce)
    launch.check_triton_device(q_window.device)
    num_q_heads, window, head_dim = q_window.shape
    num_keys = slots.numel()
    prefix_len = num_keys - window
    device = q_window.device
    sm_scale = 1.0 / math.sqrt(head_dim)
    block_d = launch.block_size(head_dim)

    block_rows = min(MAX_BLOCK_ROWS, launch.block_size(group * window))
    row_tiles = triton.cdiv(group * window, block_rows)
    if keys_per_split is None:
        keys_per_split = launch.split_size(num_keys * num_kv_heads * row_tiles, num_keys,
                                           launch.programs_to_fill(device), BLOCK_KEYS)
    elif not is_int(keys_per_split) or keys_per_split < 1:
        raise ValueError(f"keys_per_split must be an int >= 1, got {keys_per_split!r}")
    splits = triton.cdiv(num_keys, keys_per_split)
    split_max = torch.empty(splits, num_q_heads, window, dtype=torch.float32, device=device)
    split_sum = torch.empty_like(split_max)
    _window_row_max_sum_kernel[launch.checked_grid(num_kv_heads, row_tiles, splits)](
        q_window, k_buffer, slots, split_max, split_sum,
        q_window.stride(0), q_window.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        num_keys, prefix_len, window, group, keys_per_split, sm_scale,
        HEAD_DIM=head_dim, BLOCK_M=block_rows, BLOCK_N=BLOCK_KEYS, BLOCK_D=block_d,
        num_warps=launch.TILE_NUM_WARPS,
    )
    # Key 0 is visible to every window row, so the row maximum over splits is finite.
    row_max = split_max.amax(dim=0)
    row_lse = row_max + torch.log((split_sum * torch.exp(split_max - row_max)).sum(dim=0))

    key_blocks = triton.cdiv(prefix_len, BLOCK_KEYS)
    mass = torch.empty(num_kv_heads, prefix_len, dtype=torch.float32, device=device)
    block_value_norm = torch.empty(num_kv_heads, key_blocks, dtype=torch.float32, device=device)
    _window_column_mass_kernel[launch.checked_grid(num_kv_heads, key_blocks)](
        q_window, k_buffer, v_buffer, slots, row_lse, mass, block_value_norm,
        q_window.stride(0), q_window.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        prefix_len, window, group, sm_scale,
        HEAD_DIM=head_dim, GQA_MAX=gqa_reduce == "max", VALUE_NORM=with_value_norm,
        BLOCK_W=min(MAX_BLOCK_ROWS, launch.block_size(window)), BLOCK_N=BLOCK_KEYS, BLOCK_D=block_d,
        num_warps=launch.TILE_NUM_WARPS,
    )
    return WindowStatistics(mass=mass, value_norm=block_value_norm.amax(dim=1) if with_value_norm else None)


def window_statistics_reference(
    q_window: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    slots: torch.Tensor,
    *,
    gqa_reduce: str = "max",
    with_value_norm: bool = False,
) -> WindowStatistics:
    """The same statistics with the policy's torch functions on gathered [Hkv, n, d] rows."""
    _check_inputs(q_window, k_buffer, v_buffer, slots, gqa_reduce)
    keys, values = k_buffer[slots].transpose(0, 1), v_buffer[slots].transpose(0, 1)
    prefix_len = slots.numel() - q_window.shape[1]
    value_norm = score_ops.value_norm_scale(values, prefix_len) if with_value_norm else None
    return WindowStatistics(mass=score_ops.window_attention_mass(q_window, keys, gqa_reduce), value_norm=value_norm)
