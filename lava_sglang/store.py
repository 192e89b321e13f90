"""The compressed KV store: where the kept rows of a compressed prefix live.

A compressed prefix keeps a different number of rows per (layer, KV head), so it does not
fit the token-slot layout of a KV pool (one slot = one token in every layer and head). The
store borrows whole slots from the pool's own allocator and uses their memory as a flat
array of cells: a borrowed slot gives `num_layers x num_kv_heads` cells (one in each layer
buffer and head). The kept rows of a prefix are laid out one after another in (layer, KV
head, position) order over the cells of its slots, filling the first layer buffer's cells
before the next, so a prefix costs ceil(kept rows / (layers x heads)) slots whatever its
per-layer budgets are, and the memory comes out of the pool the serving engine profiled.

Nothing here knows SGLang: buffers are per-layer tensors `[pool_slots, num_kv_heads,
head_dim]`, slots are int64 indices into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def slots_needed(kept_rows: int, num_layers: int, num_kv_heads: int) -> int:
    """Pool slots that hold `kept_rows` cells."""
    cells_per_slot = num_layers * num_kv_heads
    return -(-kept_rows // cells_per_slot)


@dataclass(frozen=True)
class CellLayout:
    """Row placement of one compressed prefix.

    slots: [num_slots] int64 pool slots the prefix owns.
    kept_lengths: [num_layers, num_kv_heads] int64 rows each (layer, KV head) keeps.
    Row r of the prefix's flat row order lives in layer buffer r // (num_slots * Hkv), at
    cell r % (num_slots * Hkv) of that buffer's [slots, Hkv] grid restricted to `slots`.
    """

    slots: torch.Tensor
    kept_lengths: torch.Tensor
    head_offsets: torch.Tensor = field(init=False)
    kept_rows: int = field(init=False)  # a host int: the store's counters read it for every entry
    _per_layer: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        num_layers, num_kv_heads = self.kept_lengths.shape
        if self.slots.dim() != 1 or self.slots.dtype != torch.int64:
            raise ValueError(f"slots must be a 1-D int64 tensor, got {self.slots.dtype} {tuple(self.slots.shape)}")
        capacity = self.slots.numel() * num_layers * num_kv_heads
        if int(self.kept_lengths.sum()) > capacity:
            raise ValueError(f"{int(self.kept_lengths.sum())} rows do not fit {self.slots.numel()} slots "
                             f"({capacity} cells)")
        offsets = torch.zeros(num_layers * num_kv_heads + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(self.kept_lengths.flatten(), 0)
        object.__setattr__(self, "head_offsets", offsets)
        object.__setattr__(self, "kept_rows", int(offsets[-1]))

    @property
    def num_layers(self) -> int:
        return self.kept_lengths.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kept_lengths.shape[1]

    def layer_rows(self, layer: int) -> tuple[int, int]:
        """[start, stop) of `layer`'s rows in the flat row order."""
        first = layer * self.num_kv_heads
        return int(self.head_offsets[first]), int(self.head_offsets[first + self.num_kv_heads])

    def layer_head_indptr(self, layer: int) -> torch.Tensor:
        """[Hkv + 1] offsets of each KV head's rows inside the layer's gathered rows."""
        first = layer * self.num_kv_heads
        offsets = self.head_offsets[first:first + self.num_kv_heads + 1]
        return offsets - offsets[0]

    def layer_cells(self, layer: int) -> list[tuple[int, torch.Tensor]]:
        """`cells` of `layer`'s rows, computed once per layer (the attention reads them every step)."""
        cached = self._per_layer.get(layer)
        if cached is None:
            cached = self._per_layer[layer] = self.cells(*self.layer_rows(layer))
        return cached

    def layer_head_bounds(self, layer: int) -> list[int]:
        """`layer_head_indptr` as a list, computed once per layer (the attention reads it every step)."""
        cached = self._per_layer.get(("heads", layer))
        if cached is None:
            cached = self._per_layer[("heads", layer)] = self.layer_head_indptr(layer).tolist()
        return cached

    def padded_layer_cells(self, layer: int) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor]:
        """`layer`'s rows as a [Hkv, P] grid, P the most rows a head keeps, for reading straight
        from the pool (`read_padded_layer`): (pieces, visible). pieces: (layer buffer, cells)
        whose cells, concatenated, are the grid's in (head, column) order; visible [Hkv, P]
        bool, False on the padding. A padding column repeats its head's last row (a head that
        keeps nothing: the next head's first), so the grid walks the layer's rows in order and
        each buffer the layer spans is one piece. Computed once per layer."""
        cached = self._per_layer.get(("padded", layer))
        if cached is None:
            lengths = self.kept_lengths[layer]
            width = int(lengths.max()) if lengths.numel() else 0
            columns = torch.arange(width)
            visible = columns[None, :] < lengths[:, None]
            last_column = (lengths[:, None] - 1).clamp(min=0)
            rows = self.layer_head_indptr(layer)[:-1, None] + torch.minimum(columns[None, :], last_column)
            rows = rows.flatten().clamp(max=int(lengths.sum()) - 1)
            pieces = []
            if rows.numel():
                layer_cells = self.layer_cells(layer)
                cells = torch.cat([piece for _, piece in layer_cells])[rows]
                buffers = torch.cat([torch.full((piece.numel(),), buffer) for buffer, piece in layer_cells])[rows]
                runs, counts = torch.unique_consecutive(buffers, return_counts=True)
                pieces = list(zip(runs.tolist(), cells.split(counts.tolist())))
            cached = self._per_layer[("padded", layer)] = (pieces, visible)
        return cached

    def cells(self, start: int, stop: int) -> list[tuple[int, torch.Tensor]]:
        """Where rows [start, stop) live: (layer buffer, cell indices into the buffer viewed
        as [pool_slots * Hkv, head_dim]) pieces, in row order."""
        cells_per_buffer = self.slots.numel() * self.num_kv_heads
        pieces = []
        row = start
        while row < stop:
            buffer = row // cells_per_buffer
            piece_stop = min(stop, (buffer + 1) * cells_per_buffer)
            local = torch.arange(row - buffer * cells_per_buffer, piece_stop - buffer * cells_per_buffer,
                                 device=self.slots.device)  # SGLang's allocator gives the slots on its device
            slot = self.slots[local // self.num_kv_heads]
            pieces.append((buffer, slot * self.num_kv_heads + local % self.num_kv_heads))
            row = piece_stop
        return pieces


def _flat(buffer: torch.Tensor) -> torch.Tensor:
    return buffer.view(-1, buffer.shape[-1])


def write_kept(layout: CellLayout, kept: list[list[torch.Tensor]], k_buffers, v_buffers, source_slots: torch.Tensor,
               *, use_kernel: bool | None = None) -> None:
    """Copy a prefix's kept rows from the pool into the layout's cells (compaction).

    kept[layer][kv_head]: positions into `source_slots`, the prefix's pool slots in token
    order (a plan's kept lists). A layer's rows of every head are copied together: with
    `use_kernel` (default: on CUDA) one Triton `copy_rows` launch per buffer piece, K and V
    in the same launch; otherwise one torch gather and scatter. The prefix's slots and the
    layout's are distinct allocations, so reads and writes never overlap.
    """
    from lava_sglang.kernels.compaction import copy_rows, copy_rows_reference

    device = source_slots.device
    use_kernel = source_slots.is_cuda if use_kernel is None else use_kernel
    copy = copy_rows if use_kernel else copy_rows_reference
    for layer, heads in enumerate(kept):
        lengths = torch.tensor([len(positions) for positions in heads])
        if len(heads) != layout.num_kv_heads or not torch.equal(lengths, layout.kept_lengths[layer]):
            raise ValueError(f"layer {layer} keeps {layout.kept_lengths[layer].tolist()} rows per head, got kept "
                             f"lists of {lengths.tolist()}")
        src_slots = source_slots[torch.cat(list(heads)).to(device)]
        src_heads = torch.repeat_interleave(torch.arange(len(heads)), lengths).to(device)
        done = 0
        for buffer, cells in layout.layer_cells(layer):
            rows = slice(done, done + cells.numel())
            done += cells.numel()
            head_dim = k_buffers[buffer].shape[-1]
            copy(k_buffers[layer], v_buffers[layer], k_buffers[buffer].view(-1, 1, head_dim),
                 v_buffers[buffer].view(-1, 1, head_dim), src_slots[rows], src_heads[rows], cells.to(device))


def read_layer(layout: CellLayout, layer: int, k_buffers, v_buffers) -> tuple[torch.Tensor, torch.Tensor]:
    """`layer`'s kept keys and values, [rows of the layer, head_dim] each, in (head, position)
    order; split by `layout.layer_head_bounds(layer)`."""
    keys, values = [], []
    for buffer, cells in layout.layer_cells(layer):
        cells = cells.to(k_buffers[buffer].device)
        keys.append(_flat(k_buffers[buffer]).index_select(0, cells))
        values.append(_flat(v_buffers[buffer]).index_select(0, cells))
    if not keys:
        return (k_buffers[0].new_empty((0, k_buffers[0].shape[-1])),
                v_buffers[0].new_empty((0, v_buffers[0].shape[-1])))
    if len(keys) == 1:
        return keys[0], values[0]
    return torch.cat(keys), torch.cat(values)


def read_padded_layer(layout: CellLayout, layer: int, k_buffers, v_buffers
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`layer`'s kept keys and values as padded [Hkv, P, head_dim] grids, and visible [Hkv, P]
    (`CellLayout.padded_layer_cells`; visible stays on the CPU): one gather per layer buffer
    the layer spans, straight into the grid."""
    pieces, visible = layout.padded_layer_cells(layer)
    num_kv_heads, width = visible.shape
    keys = k_buffers[0].new_empty((num_kv_heads * width, k_buffers[0].shape[-1]))
    values = v_buffers[0].new_empty((num_kv_heads * width, v_buffers[0].shape[-1]))
    done = 0
    for buffer, cells in pieces:
        rows = slice(done, done + cells.numel())
        done += cells.numel()
        cells = cells.to(keys.device)
        torch.index_select(_flat(k_buffers[buffer]), 0, cells, out=keys[rows])
        torch.index_select(_flat(v_buffers[buffer]), 0, cells, out=values[rows])
    return keys.view(num_kv_heads, width, keys.shape[-1]), values.view(num_kv_heads, width, values.shape[-1]), visible


class LayoutTables:
    """Every stored entry's `CellLayout` in fixed-size device tables, the form
    `kernels.pool_prefix_attention` reads (see it for the format): allocated once, updated in
    place when an entry is added or removed, never reallocated, so a captured CUDA graph
    stays valid while entries come and go.

    max_entries: table rows (entries stored at once); the slot list holds up to twice the
    pool's slots (an entry's slots are pool slots, so the live ones never exceed the pool)
    and is compacted when the free space is too fragmented for a new entry.
    """

    def __init__(self, *, max_entries: int, pool_slots: int, num_layers: int, num_kv_heads: int,
                 device: torch.device | str):
        self.head_offsets = torch.zeros(max_entries, num_layers * num_kv_heads + 1, dtype=torch.int32, device=device)
        self.slot_list = torch.zeros(2 * pool_slots, dtype=torch.int32, device=device)
        self.slot_base = torch.zeros(max_entries, dtype=torch.int32, device=device)
        self.num_slots = torch.ones(max_entries, dtype=torch.int32, device=device)
        self.slot_to_row = torch.full((pool_slots,), -1, dtype=torch.int32, device=device)
        self.prefix_lens = torch.zeros(max_entries, dtype=torch.int32, device=device)  # where own tokens start
        self._free_rows = list(range(max_entries - 1, -1, -1))
        self._regions: dict[int, tuple[int, int, torch.Tensor]] = {}  # row -> (base, count, slots)

    @property
    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.head_offsets, self.slot_list, self.slot_base, self.num_slots

    @property
    def has_free_row(self) -> bool:
        return bool(self._free_rows)

    def add(self, layout: CellLayout, prefix_len: int) -> int | None:
        """Write `layout`, a compressed prefix of `prefix_len` tokens, into a free row; its row,
        or None when every row is taken."""
        if not self._free_rows:
            return None
        count = layout.slots.numel()
        base = self._find_space(count)
        if base is None:
            self._compact()
            base = self._find_space(count)
        # The copies that allocate (a device out of memory) before a row is taken: one that
        # failed would leave its row neither free nor used.
        device = self.slot_list.device
        slots = layout.slots.to(device, torch.int64)  # int64: it indexes slot_to_row as it is
        head_offsets = layout.head_offsets.to(device, torch.int32)
        row = self._free_rows.pop()
        self.slot_list[base:base + count] = slots
        self.head_offsets[row] = head_offsets
        self.slot_base[row] = base
        self.num_slots[row] = max(count, 1)
        self.prefix_lens[row] = prefix_len
        self.slot_to_row[slots] = row
        self._regions[row] = (base, count, slots)
        return row

    def remove(self, row: int) -> None:
        _, _, slots = self._regions.pop(row)
        self.slot_to_row[slots] = -1
        self._free_rows.append(row)

    def rows_for_slots(self, first_slots: torch.Tensor) -> torch.Tensor:
        """The table row of the entry each request uses (-1: none), from the first slot of its
        KV row, on the device: no host read."""
        return self.slot_to_row[first_slots.long()]

    def _find_space(self, count: int) -> int | None:
        """The first gap of `count` free places in the slot list (first fit)."""
        end = 0
        for base, used, _ in sorted(self._regions.values(), key=lambda region: region[0]):
            if base - end >= count:
                return end
            end = max(end, base + used)  # an empty region may sit inside the span of another
        return end if self.slot_list.numel() - end >= count else None

    def _compact(self) -> None:
        """Move every live region to the front of the slot list, in place."""
        end = 0
        for row, (base, count, slots) in sorted(self._regions.items(), key=lambda item: item[1][0]):
            self.slot_list[end:end + count] = slots
            self.slot_base[row] = end
            self._regions[row] = (end, count, slots)
            end += count


#: What `CompressedStore.stats` sums over the entries.
ENTRY_SUMS = ("prefix_tokens", "stored_rows", "borrowed_slots", "bytes_stored", "bytes_saved")


@dataclass
class StoreEntry:
    """One compressed prefix in the store."""

    entry_id: int
    prefix_len: int
    layout: CellLayout
    policy: str
    compress_seconds: float
    bytes_per_row: int
    table_row: int  # its row in the store's LayoutTables

    @property
    def full_rows(self) -> int:
        """Rows the prefix takes uncompressed: every layer and KV head, every token."""
        return self.layout.num_layers * self.layout.num_kv_heads * self.prefix_len

    @property
    def kept_ratio(self) -> float:
        return self.layout.kept_rows / self.full_rows

    @property
    def bytes_stored(self) -> int:
        return self.layout.kept_rows * self.bytes_per_row

    @property
    def bytes_saved(self) -> int:
        return (self.full_rows - self.layout.kept_rows) * self.bytes_per_row


class CompressedStore:
    """The entries, and their layouts in `tables`, which the attention path reads.

    A request whose KV row starts with an entry's first slot attends to that entry's
    compressed prefix (the radix cache writes an entry's slots first in its node value); the
    tables map every slot an entry owns to its table row (`LayoutTables.rows_for_slots`).
    """

    def __init__(self, tables: LayoutTables):
        self.entries: dict[int, StoreEntry] = {}
        self.tables = tables
        self._entry_of_row: dict[int, StoreEntry] = {}
        self._next_id = 0
        self.compressions = 0
        self.compress_seconds = 0.0
        self.evictions = 0
        # Sums over the entries, kept as they come and go: `stats` runs at every compression and
        # eviction (the metrics' gauges), and a walk over thousands of entries would stall the
        # scheduler when an eviction drops many.
        self._sums = dict.fromkeys(ENTRY_SUMS, 0)

    def add(self, prefix_len: int, layout: CellLayout, *, policy: str, compress_seconds: float,
            bytes_per_row: int) -> StoreEntry:
        if not self.has_room:
            raise ValueError(f"the store's layout tables are full ({len(self.entries)} entries)")
        table_row = self.tables.add(layout, prefix_len)
        entry = StoreEntry(self._next_id, prefix_len, layout, policy, compress_seconds, bytes_per_row, table_row)
        self._next_id += 1
        self.entries[entry.entry_id] = entry
        self._entry_of_row[table_row] = entry
        self._add_sums(entry, 1)
        self.compressions += 1
        self.compress_seconds += compress_seconds
        return entry

    def remove(self, entry_id: int) -> StoreEntry:
        """Forget an evicted entry (its slots are the caller's to free)."""
        entry = self._forget(entry_id)
        self.evictions += 1
        return entry

    def withdraw(self, entry_id: int) -> None:
        """Undo the `add` of an entry that never served (its tree node could not be made): it
        counts neither as a compression nor as an eviction."""
        entry = self._forget(entry_id)
        self.compressions -= 1
        self.compress_seconds -= entry.compress_seconds

    def _forget(self, entry_id: int) -> StoreEntry:
        entry = self.entries.pop(entry_id)
        del self._entry_of_row[entry.table_row]
        self.tables.remove(entry.table_row)
        self._add_sums(entry, -1)
        return entry

    def _add_sums(self, entry: StoreEntry, sign: int) -> None:
        values = (entry.prefix_len, entry.layout.kept_rows, entry.layout.slots.numel(), entry.bytes_stored,
                  entry.bytes_saved)
        for name, value in zip(ENTRY_SUMS, values, strict=True):
            self._sums[name] += sign * value

    @property
    def has_room(self) -> bool:
        """Whether one more entry fits the layout tables."""
        return self.tables.has_free_row

    def clear(self) -> None:
        """Forget every entry, and the counters with them: after SGLang's /flush_cache the
        store reports what was compressed since (`bench serve --url` flushes, then reads them)."""
        for entry in self.entries.values():
            self.tables.remove(entry.table_row)
        self.entries.clear()
        self._entry_of_row.clear()
        self._sums = dict.fromkeys(ENTRY_SUMS, 0)
        self.compressions, self.compress_seconds, self.evictions = 0, 0.0, 0

    def entries_for_slots(self, first_slots: torch.Tensor) -> list[StoreEntry | None]:
        """The entry each request uses, from the first slot of its KV row."""
        if not self.entries:  # nothing stored: no device read (a host sync on CUDA at every batch)
            return [None] * first_slots.numel()
        rows = self.tables.rows_for_slots(first_slots).tolist()
        return [self._entry_of_row[row] if row >= 0 else None for row in rows]

    def stats(self) -> dict:
        return {
            "entries": len(self.entries),
            **self._sums,
            "compressions": self.compressions,
            "compress_seconds": self.compress_seconds,
            "evictions": self.evictions,
        }
