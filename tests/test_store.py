"""The compressed store's cell layout: every kept row has its own cell inside the borrowed slots."""

from __future__ import annotations

import pytest
import torch

from lava_sglang.store import CellLayout, CompressedStore, LayoutTables, read_layer, read_padded_layer, slots_needed
from store_support import write_layer

POOL_SLOTS, NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 40, 3, 2, 4


def make_buffers():
    return ([torch.zeros(POOL_SLOTS, NUM_KV_HEADS, HEAD_DIM) for _ in range(NUM_LAYERS)],
            [torch.zeros(POOL_SLOTS, NUM_KV_HEADS, HEAD_DIM) for _ in range(NUM_LAYERS)])


def test_slots_needed_rounds_up_to_whole_slots():
    assert slots_needed(0, 3, 2) == 0
    assert slots_needed(6, 3, 2) == 1
    assert slots_needed(7, 3, 2) == 2


def test_rows_round_trip_and_touch_only_the_borrowed_slots():
    # Unequal budgets per layer and head: layer 1 keeps 9 rows, layer 2 keeps 1.
    kept_lengths = torch.tensor([[3, 2], [4, 5], [0, 1]])
    slots = torch.tensor([7, 3, 12], dtype=torch.int64)
    assert slots_needed(int(kept_lengths.sum()), NUM_LAYERS, NUM_KV_HEADS) == 3
    layout = CellLayout(slots, kept_lengths)
    k_buffers, v_buffers = make_buffers()
    rows = {}
    for layer in range(NUM_LAYERS):
        count = int(kept_lengths[layer].sum())
        keys = torch.arange(count * HEAD_DIM, dtype=torch.float32).view(count, HEAD_DIM) + 1000 * (layer + 1)
        rows[layer] = (keys, -keys)
        write_layer(layout, layer, k_buffers, v_buffers, keys, -keys)
    for layer in range(NUM_LAYERS):
        keys, values = read_layer(layout, layer, k_buffers, v_buffers)
        torch.testing.assert_close(keys, rows[layer][0])
        torch.testing.assert_close(values, rows[layer][1])
        assert layout.layer_head_indptr(layer).tolist() == [0, int(kept_lengths[layer, 0]),
                                                            int(kept_lengths[layer].sum())]
    untouched = torch.ones(POOL_SLOTS, dtype=torch.bool)
    untouched[slots] = False
    for buffer in k_buffers + v_buffers:
        assert not buffer[untouched].any()
    # 15 rows fill the 18 cells of 3 slots: no two rows share a cell.
    cells = [(buffer, int(cell)) for start, stop in [(0, layout.kept_rows)]
             for buffer, indices in layout.cells(start, stop) for cell in indices]
    assert len(set(cells)) == layout.kept_rows == 15


@pytest.mark.parametrize("kept_lengths", [[[3, 2], [4, 5], [0, 1]], [[1, 6], [5, 0], [0, 0]]])
def test_padded_rows_are_each_heads_rows_then_its_last_repeated(kept_lengths):
    # Layer 1 of the first layout spans three layer buffers (6 cells each); heads that keep
    # nothing (a whole layer, in the second) give all-hidden columns.
    kept_lengths = torch.tensor(kept_lengths)
    layout = CellLayout(torch.tensor([7, 3, 12], dtype=torch.int64), kept_lengths)
    k_buffers, v_buffers = make_buffers()
    for layer in range(NUM_LAYERS):
        count = int(kept_lengths[layer].sum())
        keys = torch.arange(count * HEAD_DIM, dtype=torch.float32).view(count, HEAD_DIM) + 1000 * (layer + 1)
        write_layer(layout, layer, k_buffers, v_buffers, keys, -keys)
    assert len(layout.padded_layer_cells(1)[0]) == (3 if kept_lengths[1].sum() == 9 else 1)
    for layer in range(NUM_LAYERS):
        keys, values, visible = read_padded_layer(layout, layer, k_buffers, v_buffers)
        rows, _ = read_layer(layout, layer, k_buffers, v_buffers)
        width = int(kept_lengths[layer].max())
        assert keys.shape == values.shape == (NUM_KV_HEADS, width, HEAD_DIM)
        assert visible.tolist() == [[column < length for column in range(width)] for length in kept_lengths[layer]]
        torch.testing.assert_close(values, -keys)
        bounds = layout.layer_head_bounds(layer)
        for head in range(NUM_KV_HEADS):
            head_rows = rows[bounds[head]:bounds[head + 1]]
            torch.testing.assert_close(keys[head, :len(head_rows)], head_rows)
            if 0 < len(head_rows) < width:  # padding repeats a real row of the layer
                padding = head_rows[-1:].expand(width - len(head_rows), -1)
                torch.testing.assert_close(keys[head, len(head_rows):], padding)


def test_cells_are_on_the_slots_device():
    # On a GPU SGLang's allocator gives the slots there; every cell index derived from them must
    # be too (a CPU range added to them failed every compression). The meta device stands in for
    # the GPU, so that this fails on the CPU too.
    layout = CellLayout(torch.arange(4, device="meta"), torch.tensor([[3, 2], [1, 4]]))
    pieces = [cells for layer in range(2) for _, cells in layout.layer_cells(layer)]
    assert pieces and all(cells.device.type == "meta" for cells in pieces)


def test_layout_refuses_rows_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        CellLayout(torch.tensor([1], dtype=torch.int64), torch.tensor([[4, 3], [0, 0], [0, 0]]))


def test_store_maps_first_slots_to_entries_until_removed():
    store = CompressedStore(_tables())
    layout = CellLayout(torch.tensor([5, 9], dtype=torch.int64), torch.tensor([[2, 2], [2, 2], [1, 1]]))
    entry = store.add(100, layout, policy="lava", compress_seconds=0.5, bytes_per_row=16)
    found = store.entries_for_slots(torch.tensor([5, 9, 6]))
    assert found[0] is entry and found[1] is entry and found[2] is None
    assert entry.kept_ratio == pytest.approx(10 / (NUM_LAYERS * NUM_KV_HEADS * 100))
    assert entry.bytes_saved == (600 - 10) * 16
    assert store.stats()["stored_rows"] == 10 and store.stats()["borrowed_slots"] == 2
    other = store.add(50, CellLayout(torch.tensor([3], dtype=torch.int64), torch.tensor([[1, 1], [1, 0], [0, 0]])),
                      policy="lava", compress_seconds=0.25, bytes_per_row=16)
    assert store.stats()["prefix_tokens"] == 150 and store.stats()["bytes_saved"] == (600 - 10 + 300 - 3) * 16
    store.remove(entry.entry_id)
    assert store.entries_for_slots(torch.tensor([5, 9])) == [None, None]
    # The sums follow the entries that remain.
    assert {key: store.stats()[key] for key in ("prefix_tokens", "stored_rows", "borrowed_slots", "bytes_stored",
                                                 "bytes_saved")} == {
        "prefix_tokens": 50, "stored_rows": 3, "borrowed_slots": 1, "bytes_stored": 48, "bytes_saved": 297 * 16}
    store.withdraw(other.entry_id)
    # An empty store answers without reading the tables (a device read and host sync per batch on CUDA).
    store.tables = None
    assert store.entries_for_slots(torch.tensor([5, 9])) == [None, None]
    assert store.stats()["entries"] == 0 and store.stats()["compressions"] == store.stats()["evictions"] == 1
    assert store.stats()["prefix_tokens"] == store.stats()["bytes_saved"] == 0


def test_a_withdrawn_entry_counts_neither_as_compressed_nor_as_evicted():
    # The radix cache withdraws an entry whose tree node could not be made.
    store = CompressedStore(_tables())
    layout = CellLayout(torch.tensor([5, 9], dtype=torch.int64), torch.tensor([[2, 2], [2, 2], [1, 1]]))
    kept = store.add(100, layout, policy="lava", compress_seconds=0.5, bytes_per_row=16)
    withdrawn = store.add(100, layout, policy="lava", compress_seconds=0.25, bytes_per_row=16)
    store.withdraw(withdrawn.entry_id)
    stats = store.stats()
    assert (stats["entries"], stats["compressions"], stats["evictions"]) == (1, 1, 0)
    assert stats["compress_seconds"] == pytest.approx(0.5)
    assert list(store.entries) == [kept.entry_id]


def _tables(max_entries=3, pool_slots=POOL_SLOTS):
    return LayoutTables(max_entries=max_entries, pool_slots=pool_slots, num_layers=NUM_LAYERS,
                        num_kv_heads=NUM_KV_HEADS, device="cpu")


def _layout(slots):
    kept = torch.zeros(NUM_LAYERS, NUM_KV_HEADS, dtype=torch.int64)
    kept[0, 0] = len(slots) * NUM_LAYERS * NUM_KV_HEADS
    return CellLayout(torch.tensor(slots, dtype=torch.int64), kept)


def _check_rows(tables, live):
    """Each live row's tables describe its layout: offsets, its slots, the slot -> row map."""
    for row, layout in live.items():
        base, count = int(tables.slot_base[row]), layout.slots.numel()
        assert tables.slot_list[base:base + count].tolist() == layout.slots.tolist()
        assert int(tables.num_slots[row]) == count
        assert tables.head_offsets[row].tolist() == layout.head_offsets.tolist()
        assert tables.rows_for_slots(layout.slots).tolist() == [row] * count


def test_a_layout_that_cannot_be_copied_to_the_device_leaves_every_row_free(monkeypatch):
    # The copies that allocate (a device out of memory) come before a row is taken.
    from types import SimpleNamespace

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    tables = _tables(max_entries=1)
    layout = _layout([0, 1])
    with pytest.raises(RuntimeError, match="out of memory"):
        tables.add(SimpleNamespace(slots=layout.slots, head_offsets=SimpleNamespace(to=out_of_memory)), prefix_len=4)
    assert tables.has_free_row
    with monkeypatch.context() as patch:  # nor after: an int64 copy of the slots once indexed with them
        patch.setattr(torch.Tensor, "long", out_of_memory)
        assert tables.add(layout, prefix_len=4) == 0
        tables.remove(0)
    assert tables.add(layout, prefix_len=4) == 0
    _check_rows(tables, {0: layout})


def test_layout_tables_reuse_rows_and_compact_the_slot_list_in_place():
    # The tables keep their storage through adds, removes and compaction (a captured graph
    # reads the same tensors), and describe every live entry throughout.
    tables = _tables(max_entries=4, pool_slots=8)
    storage = [tensor.data_ptr() for tensor in tables.tables]
    live = {}
    for slots in ([0], [1, 2], [3], [4, 5]):
        layout = _layout(slots)
        row = tables.add(layout, prefix_len=100 + slots[0])
        assert int(tables.prefix_lens[row]) == 100 + slots[0]  # a request's own tokens start there
        live[row] = layout
    _check_rows(tables, live)
    assert not tables.has_free_row and tables.add(_layout([6]), prefix_len=100) is None
    rows = list(live)
    for row in (rows[0], rows[2]):
        tables.remove(row)
        assert tables.rows_for_slots(live.pop(row).slots).tolist() == [-1]
    # The freed rows are reused; the first fit is the gap the first entry left.
    row = tables.add(_layout([6]), prefix_len=100)
    assert row in (rows[0], rows[2]) and int(tables.slot_base[row]) == 0
    live[row] = _layout([6])
    # Compaction (what add does when no gap fits) packs the live regions from place 0.
    tables._compact()
    _check_rows(tables, live)
    bases = sorted(int(tables.slot_base[row]) for row in live)
    assert bases == [0, 1, 3]
    assert [tensor.data_ptr() for tensor in tables.tables] == storage


def test_store_with_tables_keeps_rows_in_step_with_entries():
    store = CompressedStore(_tables(max_entries=2))
    first = store.add(10, _layout([5, 6]), policy="lava", compress_seconds=0.0, bytes_per_row=8)
    second = store.add(10, _layout([9]), policy="lava", compress_seconds=0.0, bytes_per_row=8)
    assert not store.has_room
    with pytest.raises(ValueError, match="layout tables are full"):
        store.add(10, _layout([11]), policy="lava", compress_seconds=0.0, bytes_per_row=8)
    _check_rows(store.tables, {first.table_row: first.layout, second.table_row: second.layout})
    store.remove(first.entry_id)
    assert store.has_room
    assert store.tables.rows_for_slots(torch.tensor([5, 6])).tolist() == [-1, -1]
    third = store.add(10, _layout([5, 7, 8]), policy="lava", compress_seconds=0.0, bytes_per_row=8)
    assert third.table_row == first.table_row
    _check_rows(store.tables, {second.table_row: second.layout, third.table_row: third.layout})
    store.clear()
    assert store.has_room and store.tables.rows_for_slots(torch.tensor([5, 7, 8, 9])).tolist() == [-1] * 4


def test_an_entry_without_slots_never_hides_a_live_region():
    # A 0-slot region (a prefix that keeps no row) gets the base of the region before it;
    # first fit must still skip that live region (it used to hand out a base inside it).
    tables = _tables(max_entries=4, pool_slots=8)
    two = _layout([1, 2])
    live = {tables.add(two, prefix_len=100): two}
    empty = CellLayout(torch.empty(0, dtype=torch.int64), torch.zeros(NUM_LAYERS, NUM_KV_HEADS, dtype=torch.int64))
    live[tables.add(empty, prefix_len=100)] = empty
    four = _layout([3, 4, 5, 6])
    live[tables.add(four, prefix_len=100)] = four
    _check_rows(tables, {row: layout for row, layout in live.items() if layout.slots.numel()})
    spans = sorted((int(tables.slot_base[row]), layout.slots.numel()) for row, layout in live.items()
                   if layout.slots.numel())
    assert all(base + count <= next_base for (base, count), (next_base, _) in zip(spans, spans[1:]))


def test_add_compacts_when_no_gap_fits(monkeypatch):
    tables = _tables(max_entries=4, pool_slots=8)
    live = {}
    for slots in ([0], [1, 2], [3]):
        layout = _layout(slots)
        live[tables.add(layout, prefix_len=100)] = layout
    first = next(iter(live))
    tables.remove(first)
    live.pop(first)
    compactions = []
    real_find, real_compact = tables._find_space, tables._compact
    monkeypatch.setattr(tables, "_find_space", lambda count: None if not compactions else real_find(count))
    monkeypatch.setattr(tables, "_compact", lambda: (compactions.append(1), real_compact()))
    layout = _layout([4, 5])
    live[tables.add(layout, prefix_len=100)] = layout
    assert compactions == [1]
    _check_rows(tables, live)
    assert sorted(int(tables.slot_base[row]) for row in live) == [0, 2, 3]
