"""Compaction: copy the kept K/V rows of a document from SGLang's pool into the compressed store.

The plan keeps, per (layer, KV head), a list of token positions. The pool holds one layer's
keys as [pool_size, Hkv, d] and finds token t at slot `slots[t]`; the store is a flat
[cells, 1, d] buffer (one for K, one for V) shared by all layers and heads, and the
allocator hands out one destination cell per kept row. `CompactionRows.from_kept` turns
those lists into three flat index tensors once per document (and checks their ranges once);
`copy_layer` then launches one kernel per layer that copies that layer's K and V rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    are not checked here (that would synchronise): `CompactionRows` checks them once.
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
    _copy_rows_kernel[(triton.cdiv(num_rows, BLOCK_ROWS),)](
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


@dataclass(frozen=True)
class CompactionRows:
    """Every kept row of one document, all layers; layer l's rows are
    [layer_indptr[l], layer_indptr[l + 1]), KV head major, positions ascending.

    src_slots: int64 pool slot of each row; src_heads: int32 its KV head; dst_cells: int64
    its store cell. pool_size, num_kv_heads, num_cells: the bounds the indices were checked
    against, so `copy_layer` can check the buffers without synchronising.
    """

    src_slots: torch.Tensor
    src_heads: torch.Tensor
    dst_cells: torch.Tensor
    layer_indptr: list[int]
    pool_size: int
    num_kv_heads: int
    num_cells: int

    @classmethod
    def from_kept(
        cls,
        slots: torch.Tensor,
        kept: Sequence[Sequence[torch.Tensor]],
        dst_cells: torch.Tensor,
        *,
        pool_size: int,
        num_cells: int,
    ) -> CompactionRows:
        """slots: int [n] the document's pool slots; kept[layer][kv_head]: int positions in
        [0, n) (a `CompressionPlan.kept`); dst_cells: int [total kept rows] the store cells,
        in (layer, KV head, position) order; pool_size, num_cells: rows of the pool buffers
        and of the store. Synchronises once to check the ranges."""
        launch.check_tensor("slots", slots, 1, launch.INDEX_DTYPES)
        launch.check_tensor("dst_cells", dst_cells, 1, launch.INDEX_DTYPES)
        if not kept or not kept[0] or any(len(layer) != len(kept[0]) for layer in kept):
            raise ValueError("kept must list, for every layer, one position tensor per KV head "
                             "(the same number of KV heads in every layer)")
        num_kv_heads = len(kept[0])
        positions = torch.cat([torch.as_tensor(p, dtype=torch.int64).flatten() for layer in kept for p in layer])
        if positions.numel() != dst_cells.numel():
            raise ValueError(f"dst_cells has {dst_cells.numel()} cells for {positions.numel()} kept rows")
        launch.check_index_range("kept positions", positions, slots.numel())
        launch.check_index_range("slots", slots, pool_size)
        launch.check_index_range("dst_cells", dst_cells, num_cells)
        heads = torch.cat([torch.full((len(p),), head, dtype=torch.int32)
                           for layer in kept for head, p in enumerate(layer)])
        layer_rows = [sum(len(p) for p in layer) for layer in kept]
        layer_indptr = [0]
        for rows in layer_rows:
            layer_indptr.append(layer_indptr[-1] + rows)
        device = slots.device
        return cls(
            src_slots=slots.long()[positions.to(device)],
            src_heads=heads.to(device),
            dst_cells=dst_cells.long().to(device),
            layer_indptr=layer_indptr,
            pool_size=pool_size,
            num_kv_heads=num_kv_heads,
            num_cells=num_cells,
        )

    @property
    def num_layers(self) -> int:
        return len(self.layer_indptr) - 1

    def layer_rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(src_slots, src_heads, dst_cells) of one layer."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        rows = slice(self.layer_indptr[layer], self.layer_indptr[layer + 1])
        return self.src_slots[rows], self.src_heads[rows], self.dst_cells[rows]

    def copy_layer(self, layer: int, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                   k_store: torch.Tensor, v_store: torch.Tensor) -> None:
        """Copy one layer's kept rows from its pool buffers into the store (one launch)."""
        _check_buffers(k_buffer, v_buffer, k_store, v_store)
        if tuple(k_buffer.shape[:2]) != (self.pool_size, self.num_kv_heads) or k_store.shape[0] != self.num_cells:
            raise ValueError(f"buffers must match the rows' bounds: pool [{self.pool_size}, {self.num_kv_heads}, d] "
                             f"and store [{self.num_cells}, 1, d], got {list(k_buffer.shape)} and "
                             f"{list(k_store.shape)}")
        copy_rows(k_buffer, v_buffer, k_store, v_store, *self.layer_rows(layer))
