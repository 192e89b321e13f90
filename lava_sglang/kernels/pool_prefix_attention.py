"""Attention over compressed prefixes read in place from the KV pool, on a grid fixed by the batch's shape.

`prefix_attention.CompressedPrefixAttention` reads a flat store through per-batch metadata
built on the host. This kernel reads the kept rows where the compressed store keeps them,
in the pool's own layer buffers, through fixed-size tables that change only when a prefix
is compressed or evicted, so one decode step needs no host work, no gather of kept rows and
no synchronisation: its launch can be captured in a CUDA graph and replayed with other
requests and other entries.

The tables describe each entry's cell layout (`lava_sglang.store.CellLayout`), row `e` of
each for table row `e`:
- `head_offsets` [E, L * Hkv + 1] int32: the entry's kept rows of (layer, KV head) are rows
  head_offsets[e, l * Hkv + h] .. head_offsets[e, l * Hkv + h + 1] of its flat row order;
- `slot_base` [E], `num_slots` [E] int32: the pool slots the entry owns are
  slot_list[slot_base[e]:slot_base[e] + num_slots[e]] of one flat int32 `slot_list`;
- row r of the flat order lives in layer buffer r // (num_slots * Hkv), at cell
  slot * Hkv + j % Hkv of that buffer's [pool_slots * Hkv, d] view, where
  j = r % (num_slots * Hkv) and slot = slot_list[slot_base[e] + j // Hkv].
The layer buffers are separate tensors: the kernel takes the first and each buffer's offset
from it in elements (`_buffer_offsets`), not loaded addresses, so that it can promise the
compiler aligned rows (`ROW_ALIGN`) and read each row in 16-byte vectors: through pointers
loaded from memory it cannot prove alignment and reads element by element, which measured
up to 4.5x slower on an H200 (CUDA-graph replays, kernels/RESULTS.md, the first H200 run's
calls 1 and 2).

Request b reads entry `entry_of_request[b]` (-1: none: out 0, lse -inf). Each (request, KV
head) is cut into `num_splits` chunks, the grid's third factor, chosen on the host from the
batch's shape alone (its request count and the query tiles of its longest request,
`PoolPrefixAttention.splits`: enough programs to fill the device, at most `max_splits`), so
the grid depends on the batch's shape, which a captured graph fixes, and never on the
entries. Each program sizes its chunk on the device from its sequence's row count (a whole
number of key blocks, one at least where there are rows), so a short sequence uses few
chunks, a long one all of them, and every row is read however long the context. Chunks past
a sequence's end write an empty state, and the chunks are merged by their LSE
(`prefix_attention._merge_splits_kernel`); with one chunk per sequence (a batch that fills the
device) the kernel writes the output itself and nothing is merged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lava_sglang.checks import is_int
from lava_sglang.kernels import launch
from lava_sglang.kernels.prefix_attention import (MAX_BLOCK_ROWS, MAX_SPLITS, _merge_splits_kernel,
                                                  check_positive_ints, empty_state, online_softmax_step,
                                                  paged_attention_reference, query_rows, request_rows,
                                                  set_heads, store_state)


@triton.jit
def _pool_prefix_attention_kernel(
    q_ptr, k_first_ptr, v_first_ptr, k_offsets_ptr, v_offsets_ptr, qo_indptr_ptr, entry_of_request_ptr,
    head_offsets_ptr, slot_list_ptr, slot_base_ptr, num_slots_ptr, out_ptr, lse_ptr,
    stride_qt, stride_qh, stride_offsets,
    stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
    layer, num_kv_heads, group, num_splits, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    work = tl.program_id(0)
    row_tile = tl.program_id(1)
    seq = work // num_splits
    split = work % num_splits
    request, kv_head, q_start, num_rows = request_rows(qo_indptr_ptr, seq, num_kv_heads, group)
    if row_tile * BLOCK_M >= num_rows:
        return
    q, tokens, heads, row_valid = query_rows(q_ptr, q_start, num_rows, row_tile, kv_head, group, stride_qt,
                                             stride_qh, HEAD_DIM, BLOCK_M, BLOCK_D)
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM

    entry = tl.load(entry_of_request_ptr + request).to(tl.int64)
    has_entry = entry >= 0
    offsets = head_offsets_ptr + entry * stride_offsets + layer * num_kv_heads + kv_head
    # Row arithmetic in int32 (an entry's rows and cells fit): int64 division is emulated.
    first_row = tl.load(offsets, mask=has_entry, other=0).to(tl.int32)
    end_row = tl.load(offsets + 1, mask=has_entry, other=0).to(tl.int32)
    cells_per_buffer = tl.load(num_slots_ptr + entry, mask=has_entry, other=1).to(tl.int32) * num_kv_heads
    entry_slots = slot_list_ptr + tl.load(slot_base_ptr + entry, mask=has_entry, other=0)
    # The sequence's rows in num_splits chunks of whole key blocks: few chunks for a short one.
    keys_per_split = tl.cdiv(tl.cdiv(end_row - first_row, num_splits), BLOCK_N) * BLOCK_N
    start = first_row + split * keys_per_split
    end = tl.minimum(start + keys_per_split, end_row)

    row_max, row_sum, acc = empty_state(BLOCK_M, BLOCK_D)
    for key_start in range(start, end, BLOCK_N):
        flat_rows = key_start + tl.arange(0, BLOCK_N)
        key_valid = flat_rows < end
        buffers = flat_rows // cells_per_buffer
        local = flat_rows % cells_per_buffer
        slots = tl.load(entry_slots + local // num_kv_heads, mask=key_valid, other=0)
        cells = (slots.to(tl.int64) * num_kv_heads + local % num_kv_heads) * HEAD_DIM
        # Row starts in elements from the first buffer; ROW_ALIGN divides each (checked on the host).
        k_rows = tl.multiple_of(tl.load(k_offsets_ptr + buffers, mask=key_valid, other=0) + cells, ROW_ALIGN)
        v_rows = tl.multiple_of(tl.load(v_offsets_ptr + buffers, mask=key_valid, other=0) + cells, ROW_ALIGN)
        kv_mask = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_first_ptr + k_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_first_ptr + v_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        row_max, row_sum, acc = online_softmax_step(q, k, v, key_valid, row_max, row_sum, acc, sm_scale)
    # A chunk past the sequence's end (or no entry) stores an empty state: out 0, lse -inf.
    # The split's offset into the partial buffers can pass 2**31.
    store_state(out_ptr, lse_ptr, split.to(tl.int64), tokens, heads, row_valid, row_max, row_sum, acc,
                stride_os, stride_ot, stride_oh, stride_ls, stride_lt, HEAD_DIM, BLOCK_D)


def default_block_keys(head_dim: int) -> int:
    """128 keys (the fastest on an H200 at head dim 128), halved for each doubling of the head
    dim past 128, so that one K or V tile stays within 128 x 128 elements: by our count two
    pipeline stages of 128-key K and V tiles at head dim 256 need 256 KB of shared memory, more
    than an H100 or H200 SM has (228 KB)."""
    fitting = max(128 * 128 // head_dim, 1)
    return max(16, min(128, 1 << (fitting.bit_length() - 1)))


def check_launch_options(*, block_keys: int, num_warps: int, num_stages: int) -> None:
    """Raise ValueError unless the kernel can launch with these options: tl.dot needs at least
    16 keys, tl.arange and the launch powers of two."""
    check_positive_ints(block_keys=block_keys, num_warps=num_warps, num_stages=num_stages)
    if block_keys < 16 or block_keys & (block_keys - 1):
        raise ValueError(f"block_keys must be a power of two >= 16, got {block_keys}")
    if num_warps & (num_warps - 1):
        raise ValueError(f"num_warps must be a power of two, got {num_warps}")


def _buffer_offsets(name: str, buffers: list[torch.Tensor], first: torch.Tensor) -> list[int]:
    """The layer buffers' offsets in elements from `buffers[0]`: what the kernel finds a row's
    buffer through."""
    for index, buffer in enumerate(buffers):
        launch.check_tensor(f"{name}[{index}]", buffer, 3, launch.FLOAT_DTYPES)
        if buffer.shape != first.shape or buffer.dtype != first.dtype or buffer.device != first.device:
            raise ValueError(f"{name}[{index}] is {buffer.dtype} {list(buffer.shape)} on {buffer.device}; "
                             f"k_buffers[0] is {first.dtype} {list(first.shape)} on {first.device}")
        if not buffer.is_contiguous():
            raise ValueError(f"{name}[{index}] must be contiguous")
    distances = [buffer.data_ptr() - buffers[0].data_ptr() for buffer in buffers]
    # Torch's tensors of one dtype start a whole number of elements apart; memory from
    # elsewhere (DLPack) might not, and a rounded offset would read the wrong rows.
    if any(distance % first.element_size() for distance in distances):
        raise ValueError(f"{name} must start a whole number of {first.dtype} elements apart, got byte distances "
                         f"{distances} from {name}[0]")
    return [distance // first.element_size() for distance in distances]


def _row_alignment(offsets: list[int], head_dim: int, element_size: int) -> int:
    """The largest power of two, up to one 16-byte vector, dividing every row's start in
    elements from the first buffer's start (the buffers' offsets and the row length): the
    kernel's ROW_ALIGN. Whether the first buffer itself is aligned, Triton checks at launch."""
    starts = offsets + [head_dim]
    align = 16 // element_size
    while align > 1 and any(start % align for start in starts):
        align //= 2
    return align


class PoolPrefixAttention:
    """Attention over compressed prefixes in the pool, on a grid fixed by the batch's shape (graph-safe `run`).

    `plan` once per batch, `run` per layer:

    >>> attention = PoolPrefixAttention(k_buffers, v_buffers, num_q_heads=32)
    >>> attention.plan(qo_indptr, entry_of_request, tables, num_tokens=batch, max_q_len=1)
    >>> out, lse = attention.run(q, layer=layer)

    k_buffers, v_buffers: the pool's layer buffers [pool_slots, Hkv, d] (one shape and dtype,
    contiguous; their addresses are read once, as a server's pool never moves).
    max_splits: the most chunks one (request, KV head) is cut into (split-K; at most
    `prefix_attention.MAX_SPLITS`, what the merge takes). The partial
    states take max_splits x the output in fp32: extend batches (many query tokens) want
    max_splits = 1.
    target_programs: the programs a launch aims at, which `splits` sizes the chunk count for
    (default: a few waves of the device's SMs, `launch.programs_to_fill`).
    block_keys, num_warps, num_stages: the kernel's key-block size (a power of two, at least
    16; default `default_block_keys(head_dim)`: 128 up to head dim 128) and its launch
    options (num_warps a power of two). The defaults ran fastest on an H200 in two sweeps of
    18 and 24 combinations (32-256 keys, 4 or 8 warps, 1-4 stages;
    `kernels/tune_pool_attention.py`, kernels/RESULTS.md): 0.72x the time of the former 64
    keys, 8 warps and 3 stages (geometric mean over 8K and 32K tokens, batches 1 and 64, keep
    0.2 and 1). They were timed on decode at head dim 128; extend batches (up to 64 query rows
    a program) run them untimed.
    """

    def __init__(self, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], *, num_q_heads: int,
                 max_splits: int = 16, target_programs: int | None = None, sm_scale: float | None = None,
                 block_keys: int | None = None, num_warps: int = 4, num_stages: int = 2):
        if not k_buffers or len(k_buffers) != len(v_buffers):
            raise ValueError(f"k_buffers and v_buffers must list the same layers, got {len(k_buffers)} and "
                             f"{len(v_buffers)}")
        self.k_first, self.v_first = k_buffers[0], v_buffers[0]
        k_offsets = _buffer_offsets("k_buffers", k_buffers, k_buffers[0])
        v_offsets = _buffer_offsets("v_buffers", v_buffers, k_buffers[0])
        device = k_buffers[0].device
        self.k_offsets = torch.tensor(k_offsets, dtype=torch.int64, device=device)
        self.v_offsets = torch.tensor(v_offsets, dtype=torch.int64, device=device)
        self.dtype = k_buffers[0].dtype
        self.num_layers = len(k_buffers)
        _, num_kv_heads, head_dim = k_buffers[0].shape
        self.row_align = _row_alignment(k_offsets + v_offsets, head_dim, k_buffers[0].element_size())
        if target_programs is None:
            target_programs = launch.programs_to_fill(device)
        if block_keys is None:
            block_keys = default_block_keys(head_dim)
        check_positive_ints(max_splits=max_splits, target_programs=target_programs)
        if max_splits > MAX_SPLITS:
            raise ValueError(f"max_splits must be at most {MAX_SPLITS} (the merge's limit), got {max_splits}")
        check_launch_options(block_keys=block_keys, num_warps=num_warps, num_stages=num_stages)
        set_heads(self, num_q_heads, num_kv_heads, head_dim, sm_scale)
        self.max_splits = max_splits
        self.target_programs = target_programs
        self.block_keys, self.num_warps, self.num_stages = block_keys, num_warps, num_stages
        self._planned = False

    def splits(self, num_requests: int, row_tiles: int = 1) -> int:
        """Chunks per (request, KV head) for a batch of `num_requests`: enough for the grid to
        reach `target_programs`, at most `max_splits`. A large batch fills the device with few
        long chunks, which read faster than many short ones and leave less to merge."""
        programs = max(num_requests * self.num_kv_heads * row_tiles, 1)
        return max(1, min(self.max_splits, -(-self.target_programs // programs)))

    def plan(self, qo_indptr: torch.Tensor, entry_of_request: torch.Tensor, tables: tuple[torch.Tensor, ...], *,
             num_tokens: int, max_q_len: int) -> None:
        """Build one batch's launch metadata, which every layer's `run` reuses: the request of
        each query token and the split count, from the batch's shape only.

        qo_indptr [B + 1] int32 (decode: arange); entry_of_request [B] int32 (table rows, -1:
        none); tables = (head_offsets, slot_list, slot_base, num_slots); num_tokens: the batch's
        query tokens (qo_indptr[B]); max_q_len: the most query tokens of a request (1 for
        decode). On a CUDA device it checks shapes only: nothing here reads a device value, so
        a CUDA graph can record it and an eager batch does not wait on the device (the server
        builds these values from host lists), and wrong values read or write out of bounds.
        On the CPU (Triton's interpreter) the index values are checked too.
        """
        head_offsets, slot_list, slot_base, num_slots = tables
        for name, tensor, dims in (("qo_indptr", qo_indptr, 1), ("entry_of_request", entry_of_request, 1),
                                   ("head_offsets", head_offsets, 2), ("slot_list", slot_list, 1),
                                   ("slot_base", slot_base, 1), ("num_slots", num_slots, 1)):
            launch.check_tensor(name, tensor, dims, launch.INDEX_DTYPES)
        check_positive_ints(max_q_len=max_q_len)
        if not is_int(num_tokens) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        num_requests = entry_of_request.numel()
        if qo_indptr.numel() != num_requests + 1:
            raise ValueError(f"qo_indptr must have B + 1 = {num_requests + 1} entries, got {qo_indptr.numel()}")
        if num_requests == 0 and num_tokens:
            raise ValueError(f"{num_tokens} query tokens for no request")
        if head_offsets.shape[1] != self.num_layers * self.num_kv_heads + 1:
            raise ValueError(f"head_offsets must be [entries, L * Hkv + 1 = {self.num_layers * self.num_kv_heads + 1}]"
                             f", got {list(head_offsets.shape)}")
        if not head_offsets.shape[0] == slot_base.numel() == num_slots.numel():
            raise ValueError(f"head_offsets, slot_base and num_slots must have one row per entry, got "
                             f"{head_offsets.shape[0]}, {slot_base.numel()}, {num_slots.numel()}")
        launch.check_same_device(qo_indptr=qo_indptr, entry_of_request=entry_of_request, head_offsets=head_offsets,
                                 slot_list=slot_list, slot_base=slot_base, num_slots=num_slots,
                                 k_buffers=self.k_first)
        if not qo_indptr.is_cuda:
            _check_plan_values(qo_indptr, entry_of_request, head_offsets.shape[0], num_tokens, max_q_len)
        self._qo_indptr, self._entry_of_request, self._tables = qo_indptr, entry_of_request, tables
        self._num_tokens = num_tokens
        self._block_m = min(MAX_BLOCK_ROWS, launch.block_size(max_q_len * self.group))
        self._row_tiles = -(-max_q_len * self.group // self._block_m)
        self._num_splits = self.splits(num_requests, self._row_tiles)
        self._token_request = _token_request(qo_indptr, num_tokens)
        self._splits = torch.full((num_requests * self.num_kv_heads,), self._num_splits, dtype=torch.int32,
                                  device=qo_indptr.device)
        self._planned = True

    def run(self, q: torch.Tensor, *, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The planned batch's attention over its compressed prefixes at `layer`: q [tokens, Hq,
        d] in the pool's dtype. Returns out [tokens, Hq, d] and lse [tokens, Hq] fp32 (natural
        log). Checks shapes only: nothing here reads a device value."""
        if not self._planned:
            raise ValueError("call plan() before run()")
        launch.check_tensor("q", q, 3, launch.FLOAT_DTYPES)
        launch.check_rows_contiguous("q", q)
        expected = (self._num_tokens, self.num_q_heads, self.head_dim)
        if tuple(q.shape) != expected or q.dtype != self.dtype:
            raise ValueError(f"q must be [tokens, Hq, d] = {list(expected)} (tokens from the plan) in the pool's "
                             f"dtype {self.dtype}, got {q.dtype} {list(q.shape)}")
        if not is_int(layer) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        launch.check_same_device(q=q, k_buffers=self.k_first)
        launch.check_triton_device(q.device)
        out = torch.empty(self._num_tokens, self.num_q_heads, self.head_dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(self._num_tokens, self.num_q_heads, dtype=torch.float32, device=q.device)
        if self._num_tokens == 0:
            return out, lse
        head_offsets, slot_list, slot_base, num_slots = self._tables
        num_splits = self._num_splits
        if num_splits == 1:  # one chunk per sequence is its whole state: written in place, nothing to merge
            partial_out, partial_lse = out[None], lse[None]
        else:
            partial_out = torch.empty(num_splits, self._num_tokens, self.num_q_heads, self.head_dim,
                                      dtype=torch.float32, device=q.device)
            partial_lse = torch.empty(num_splits, self._num_tokens, self.num_q_heads, dtype=torch.float32,
                                      device=q.device)
        block_d = launch.block_size(self.head_dim)
        grid = launch.checked_grid(self._entry_of_request.numel() * self.num_kv_heads * num_splits, self._row_tiles)
        _pool_prefix_attention_kernel[grid](
            q, self.k_first, self.v_first, self.k_offsets, self.v_offsets, self._qo_indptr, self._entry_of_request,
            head_offsets, slot_list, slot_base, num_slots, partial_out, partial_lse,
            q.stride(0), q.stride(1), head_offsets.stride(0),
            partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
            partial_lse.stride(0), partial_lse.stride(1),
            layer, self.num_kv_heads, self.group, num_splits, self.sm_scale,
            HEAD_DIM=self.head_dim, BLOCK_M=self._block_m, BLOCK_N=self.block_keys, BLOCK_D=block_d,
            ROW_ALIGN=self.row_align, num_warps=self.num_warps, num_stages=self.num_stages,
        )
        if num_splits > 1:
            _merge_splits_kernel[launch.checked_grid(self._num_tokens, self.num_q_heads)](
                partial_out, partial_lse, out, lse, self._token_request, self._splits,
                partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
                partial_lse.stride(0), partial_lse.stride(1), out.stride(0), out.stride(1), lse.stride(0),
                self.num_kv_heads, self.group,
                HEAD_DIM=self.head_dim, BLOCK_S=launch.block_size(self.max_splits, minimum=1), BLOCK_D=block_d,
            )
        return out, lse


def _check_plan_values(qo_indptr: torch.Tensor, entry_of_request: torch.Tensor, num_entries: int, num_tokens: int,
                       max_q_len: int) -> None:
    """The plan's index values against what the kernels assume: a request's rows beyond
    max_q_len would never be computed (the merge would read unwritten partials), tokens past
    qo_indptr[B] or entries past the tables would be read or written out of bounds."""
    num_requests = entry_of_request.numel()
    values = torch.cat([qo_indptr.long(), entry_of_request.long()]).tolist()
    offsets, entries = values[:num_requests + 1], values[num_requests + 1:]
    q_lens = [end - start for start, end in zip(offsets, offsets[1:])]
    if offsets[0] != 0 or min(q_lens, default=0) < 0 or offsets[-1] != num_tokens:
        raise ValueError(f"qo_indptr must start at 0, be non-decreasing and end at num_tokens={num_tokens}, "
                         f"got {offsets}")
    if max(q_lens, default=0) > max_q_len:
        raise ValueError(f"max_q_len={max_q_len} is below a request's {max(q_lens)} query tokens")
    if any(not -1 <= entry < num_entries for entry in entries):
        raise ValueError(f"entry_of_request must hold table rows in [0, {num_entries}) or -1 (none), got {entries}")


def _token_request(qo_indptr: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The request of each query token, on the device: no host read of qo_indptr."""
    tokens = torch.arange(num_tokens, device=qo_indptr.device)
    return (torch.searchsorted(qo_indptr[1:].long(), tokens, right=True)).to(torch.int32)


def pool_prefix_attention_reference(q: torch.Tensor, qo_indptr: torch.Tensor, entry_of_request: torch.Tensor,
                                    tables: tuple[torch.Tensor, ...],
                                    k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], *, layer: int,
                                    num_kv_heads: int,
                                    sm_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`PoolPrefixAttention.plan` and `run` in torch: each (request, KV head)'s rows found through the
    tables on the host, dense attention over them; out in fp32."""
    head_offsets, slot_list, slot_base, num_slots = (table.cpu().long() for table in tables)
    head_dim = q.shape[-1]
    entries = entry_of_request.tolist()
    nothing = q.new_zeros(0, head_dim)

    def rows_of_sequence(request: int, kv_head: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = entries[request]
        if entry < 0:
            return nothing, nothing
        column = layer * num_kv_heads + kv_head
        first, end = head_offsets[entry, column:column + 2].tolist()
        flat_rows = torch.arange(first, end)
        cells_per_buffer = int(num_slots[entry]) * num_kv_heads
        local = flat_rows % cells_per_buffer
        cells = (slot_list[slot_base[entry] + local // num_kv_heads] * num_kv_heads + local % num_kv_heads).tolist()
        buffers = (flat_rows // cells_per_buffer).tolist()
        keys = [k_buffers[b].view(-1, head_dim)[c] for b, c in zip(buffers, cells)]
        values = [v_buffers[b].view(-1, head_dim)[c] for b, c in zip(buffers, cells)]
        return (torch.stack(keys), torch.stack(values)) if keys else (nothing, nothing)

    return paged_attention_reference(q, qo_indptr, num_kv_heads, sm_scale, rows_of_sequence)
