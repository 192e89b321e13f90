"""Compaction: copy the kept K/V rows of a document from SGLang's pool into the compressed store.

The plan keeps, per (layer, KV head), a list of token positions. The pool holds one layer's
keys as [pool_size, Hkv, d] and finds token t at slot `slots[t]`; the destination is a flat
[cells, 1, d] view (one for K, one for V), one cell per kept row. `copy_rows` copies a batch
of rows, K and V in one launch; `lava_sglang.store.write_kept` calls it once per layer and
buffer piece when the server compresses a prefix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lava_sglang.kernels import launch

BLOCK_ROWS = 32


@triton.jit
def _copy_rows_kernel(
    k_src_ptr, v_src_ptr, k_dst_ptr, v_dst_ptr, src_slots_ptr, src_heads_ptr, dst_cells_ptr,
    num_rows, stride_src_slot, stride_src_head, stride_dst_cell,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = rows < num_rows
    slots = tl.load(src_slots_ptr + rows, mask=row_valid, other=0).to(tl.int64)
    heads = tl.load(src_heads_ptr + rows, mask=row_valid, other=0).to(tl.int64)
    cells = tl.load(dst_cells_ptr + rows, mask=row_valid, other=0).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    mask = row_valid[:, None] & (dims < HEAD_DIM)[None, :]
    src = (slots * stride_src_slot + heads * stride_src_head)[:, None] + dims[None, :]
    dst = (cells * stride_dst_cell)[:, None] + dims[None, :]
    tl.store(k_dst_ptr + dst, tl.load(k_src_ptr + src, mask=mask), mask=mask)
    tl.store(v_dst_ptr + dst, tl.load(v_src_ptr + src, mask=mask), mask=mask)


def _check_buffers(k_buffer, v_buffer, k_store, v_store) -> None:
    for name, tensor in (("k_buffer", k_buffer), ("v_buffer", v_buffer), ("k_store", k_store), ("v_store", v_store)):
        launch.check_tensor(name, tensor, 3, launch.FLOAT_DTYPES)
        launch.check_rows_contiguous(name, tensor)
    launch.check_same_device(k_buffer=k_buffer, v_buffer=v_buffer, k_store=k_store, v_store=v_store)
    if k_buffer.shape != v_buffer.shape:
        raise ValueError(f"k_buffer and v_buffer must have one shape [pool_size, Hkv, d], got "
                         f"{list(k_buffer.shape)} and {list(v_buffer.shape)}")
    # The kernels address V through K's strides.
    if v_buffer.stride() != k_buffer.stride() or v_store.stride() != k_store.stride():
        raise ValueError(f"v_buffer and v_store must have k_buffer's and k_store's strides, got "
                         f"{v_buffer.stride()} / {k_buffer.stride()} and {v_store.stride()} / {k_store.stride()}")
    if k_store.shape != v_store.shape or k_store.shape[1] != 1 or k_store.shape[2] != k_buffer.shape[2]:
        raise ValueError(f"k_store and v_store must both be [cells, 1, d={k_buffer.shape[2]}], got "
                         f"{list(k_store.shape)} and {list(v_store.shape)}")
    if not k_buffer.dtype == v_buffer.dtype == k_store.dtype == v_store.dtype:
        raise ValueError(f"pool buffers and store must have one dtype, got {k_buffer.dtype}, {v_buffer.dtype}, "
                         f"{k_store.dtype}, {v_store.dtype}")


def copy_rows(
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    src_slots: torch.Tensor,
    src_heads: torch.Tensor,
    dst_cells: torch.Tensor,
) -> None:
    """k_store[dst_cells[i], 0] = k_buffer[src_slots[i], src_heads[i]], the same for V, in one launch.

    k_buffer, v_buffer: [pool_size, Hkv, d] one layer's pool buffers; k_store, v_store:
    [cells, 1, d]; src_slots, src_heads, dst_cells: int [R] on the same device. Index ranges
    are not checked here (that would synchronise): the caller's layout bounds them
    (`store.write_kept`). The rows read and the rows written must not overlap (the store may
    view the same pool buffers): programs run in no order, so a row written by one could be
    read by another after it changed, where the reference gathers every row first.
    """
    _check_buffers(k_buffer, v_buffer, k_store, v_store)
    for name, tensor in (("src_slots", src_slots), ("src_heads", src_heads), ("dst_cells", dst_cells)):
        launch.check_tensor(name, tensor, 1, launch.INDEX_DTYPES)
    if not src_slots.numel() == src_heads.numel() == dst_cells.numel():
        raise ValueError(f"src_slots, src_heads, dst_cells must have one length, got "
                         f"{src_slots.numel()}, {src_heads.numel()}, {dst_cells.numel()}")
    device = launch.check_same_device(k_buffer=k_buffer, src_slots=src_slots, src_heads=src_heads,
                                      dst_cells=dst_cells)
    launch.check_triton_device(device)
    num_rows = src_slots.numel()
    if num_rows == 0:
        return
    head_dim = k_buffer.shape[2]
    _copy_rows_kernel[launch.checked_grid(triton.cdiv(num_rows, BLOCK_ROWS))](
        k_buffer, v_buffer, k_store, v_store, src_slots, src_heads, dst_cells,
        num_rows, k_buffer.stride(0), k_buffer.stride(1), k_store.stride(0),
        HEAD_DIM=head_dim, BLOCK_R=BLOCK_ROWS, BLOCK_D=launch.block_size(head_dim, minimum=1),
        num_warps=launch.TILE_NUM_WARPS,
    )


def copy_rows_reference(k_buffer, v_buffer, k_store, v_store, src_slots, src_heads, dst_cells) -> None:
    """`copy_rows` with torch indexing."""
    _check_buffers(k_buffer, v_buffer, k_store, v_store)
    k_store[dst_cells.long(), 0] = k_buffer[src_slots.long(), src_heads.long()]
    v_store[dst_cells.long(), 0] = v_buffer[src_slots.long(), src_heads.long()]
