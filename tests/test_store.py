"""The compressed store's cell layout: every kept row has its own cell inside the borrowed slots."""

from __future__ import annotations

import pytest
import torch

from lava_sglang.store import CellLayout, CompressedStore, read_layer, slots_needed, write_layer

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


def test_layout_refuses_rows_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        CellLayout(torch.tensor([1], dtype=torch.int64), torch.tensor([[4, 3], [0, 0], [0, 0]]))


def test_store_maps_first_slots_to_entries_until_removed():
    store = CompressedStore(POOL_SLOTS, "cpu")
    layout = CellLayout(torch.tensor([5, 9], dtype=torch.int64), torch.tensor([[2, 2], [2, 2], [1, 1]]))
    entry = store.add(100, layout, policy="lava", compress_seconds=0.5, bytes_per_row=16)
    found = store.entries_for_slots(torch.tensor([5, 9, 6]))
    assert found[0] is entry and found[1] is entry and found[2] is None
    assert entry.kept_ratio == pytest.approx(10 / (NUM_LAYERS * NUM_KV_HEADS * 100))
    assert entry.bytes_saved == (600 - 10) * 16
    assert store.stats()["stored_rows"] == 10 and store.stats()["borrowed_slots"] == 2
    store.remove(entry.entry_id)
    assert store.entries_for_slots(torch.tensor([5, 9])) == [None, None]
    assert store.stats()["entries"] == 0 and store.stats()["compressions"] == store.stats()["evictions"] == 1
