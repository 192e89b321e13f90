"""Compaction: kept rows land in their store cells, nothing else is written."""

import pytest
import torch

from lava_sglang.kernels.compaction import CompactionRows, copy_rows, copy_rows_reference
from lava_sglang.kernels.window_stats import window_statistics
from lava_sglang.policy import PlanBuilder, compress_plan, make_policy
from lava_sglang.policy.lava import PAPER_SPEC

SENTINEL = -7.0


def _document(num_kv_heads, seq_len, head_dim, dtype, device, num_layers=2, seed=0):
    """Per-layer pool buffers, the document's scattered slots, and kept lists with an empty
    head, a one-row head and lengths that are not multiples of the 32-row block."""
    generator = torch.Generator().manual_seed(seed)
    pool_size = seq_len + 11
    k_buffers = [torch.randn(pool_size, num_kv_heads, head_dim, generator=generator).to(device, dtype)
                 for _ in range(num_layers)]
    v_buffers = [torch.randn(pool_size, num_kv_heads, head_dim, generator=generator).to(device, dtype)
                 for _ in range(num_layers)]
    slots = torch.randperm(pool_size, generator=generator)[:seq_len].to(device)
    lengths = [0, 1, seq_len, 33, 70, 5, 40, 64]
    kept = [[torch.randperm(seq_len, generator=generator)[:lengths[(layer * 3 + head) % len(lengths)]].sort().values
             for head in range(num_kv_heads)] for layer in range(num_layers)]
    return k_buffers, v_buffers, slots, kept


def _stores(num_cells, head_dim, dtype, device):
    return [torch.full((num_cells, 1, head_dim), SENTINEL, dtype=dtype, device=device) for _ in range(2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(1, 64), (3, 128), (8, 64)])
def test_kept_rows_land_in_their_cells(device, num_kv_heads, head_dim, dtype):
    k_buffers, v_buffers, slots, kept = _document(num_kv_heads, 90, head_dim, dtype, device)
    num_rows = sum(len(p) for layer in kept for p in layer)
    num_cells = num_rows + 17
    generator = torch.Generator().manual_seed(1)
    dst_cells = torch.randperm(num_cells, generator=generator)[:num_rows].to(device)
    rows = CompactionRows.from_kept(slots, kept, dst_cells, pool_size=k_buffers[0].shape[0], num_cells=num_cells)
    k_store, v_store = _stores(num_cells, head_dim, dtype, device)
    for layer in range(len(kept)):
        rows.copy_layer(layer, k_buffers[layer], v_buffers[layer], k_store, v_store)

    cell = 0
    written = torch.zeros(num_cells, dtype=torch.bool)
    for layer, heads in enumerate(kept):
        for head, positions in enumerate(heads):
            cells = dst_cells[cell:cell + len(positions)]
            cell += len(positions)
            written[cells.cpu()] = True
            source = slots[positions.to(device)]
            # A copy: bit-exact in every dtype.
            assert torch.equal(k_store[cells, 0], k_buffers[layer][source, head])
            assert torch.equal(v_store[cells, 0], v_buffers[layer][source, head])
    untouched = (~written).to(device)
    assert bool((k_store[untouched] == SENTINEL).all()) and bool((v_store[untouched] == SENTINEL).all())


def test_kernel_matches_torch_reference(device):
    k_buffers, v_buffers, slots, kept = _document(3, 50, 64, torch.float32, device, num_layers=1)
    num_rows = sum(len(p) for p in kept[0])
    rows = CompactionRows.from_kept(slots, kept, torch.arange(num_rows, device=device),
                                    pool_size=k_buffers[0].shape[0], num_cells=num_rows)
    expected, actual = _stores(num_rows, 64, torch.float32, device), _stores(num_rows, 64, torch.float32, device)
    copy_rows_reference(k_buffers[0], v_buffers[0], *expected, *rows.layer_rows(0))
    copy_rows(k_buffers[0], v_buffers[0], *actual, *rows.layer_rows(0))
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


def test_kernel_statistics_plan_and_compaction_end_to_end(device):
    # Scores from the kernel, a plan from them, rows copied: the same plan as compress_plan
    # on the gathered tensors, and the store holds exactly the planned rows.
    num_layers, num_kv_heads, group, window, seq_len, head_dim = 3, 2, 3, 8, 75, 64
    generator = torch.Generator().manual_seed(5)
    pool_size = seq_len + 20
    slots = torch.randperm(pool_size, generator=generator)[:seq_len].to(device)
    q = [torch.randn(num_kv_heads * group, window, head_dim, generator=generator).to(device)
         for _ in range(num_layers)]
    k_buffers = [torch.randn(pool_size, num_kv_heads, head_dim, generator=generator).to(device)
                 for _ in range(num_layers)]
    v_buffers = [torch.randn(pool_size, num_kv_heads, head_dim, generator=generator).to(device)
                 for _ in range(num_layers)]
    policy = make_policy(PAPER_SPEC, window=window)  # window_statistics' defaults are the paper's
    builder = PlanBuilder(policy, 0.3, seq_len=seq_len, num_layers=num_layers, num_kv_heads=num_kv_heads)
    for layer in range(num_layers):
        stats = window_statistics(q[layer], k_buffers[layer], v_buffers[layer], slots)
        builder.add_layer_scores(stats.layer_scores())
    plan = builder.finish()
    expected = compress_plan(policy, q, [k[slots].transpose(0, 1) for k in k_buffers],
                             [v[slots].transpose(0, 1) for v in v_buffers], 0.3)
    assert all(torch.equal(ours, theirs)
               for layer_ours, layer_theirs in zip(plan.kept, expected.kept)
               for ours, theirs in zip(layer_ours, layer_theirs))

    rows = CompactionRows.from_kept(slots, plan.kept, torch.arange(plan.kept_rows, device=device),
                                    pool_size=pool_size, num_cells=plan.kept_rows)
    k_store, v_store = _stores(plan.kept_rows, head_dim, torch.float32, device)
    for layer in range(num_layers):
        rows.copy_layer(layer, k_buffers[layer], v_buffers[layer], k_store, v_store)
    expected_k = torch.cat([k_buffers[layer][slots[positions.to(device)], head]
                            for layer in range(num_layers) for head, positions in enumerate(plan.kept[layer])])
    assert torch.equal(k_store[:, 0], expected_k)


def test_bad_inputs_raise(device):  # on the GPU too: inputs on the device the kernels run on
    k_buffers, v_buffers, slots, kept = _document(2, 30, 64, torch.float32, device, num_layers=1)
    num_rows = sum(len(p) for p in kept[0])
    pool_size = k_buffers[0].shape[0]
    cells = torch.arange(num_rows, device=device)
    with pytest.raises(ValueError, match="cells for"):
        CompactionRows.from_kept(slots, kept, cells[:-1], pool_size=pool_size, num_cells=num_rows)
    with pytest.raises(ValueError, match="dst_cells must lie in"):
        CompactionRows.from_kept(slots, kept, cells, pool_size=pool_size, num_cells=num_rows - 1)
    with pytest.raises(ValueError, match="slots must lie in"):
        CompactionRows.from_kept(slots, kept, cells, pool_size=int(slots.max()), num_cells=num_rows)
    with pytest.raises(ValueError, match="kept positions must lie in"):
        CompactionRows.from_kept(slots[:3], kept, cells, pool_size=pool_size, num_cells=num_rows)
    with pytest.raises(ValueError, match="one position tensor per KV head"):
        CompactionRows.from_kept(slots, [kept[0], kept[0][:1]], cells, pool_size=pool_size, num_cells=num_rows)
    rows = CompactionRows.from_kept(slots, kept, cells, pool_size=pool_size, num_cells=num_rows)
    k_store, v_store = _stores(num_rows, 64, torch.float32, device)
    with pytest.raises(ValueError, match="match the rows' bounds"):
        rows.copy_layer(0, k_buffers[0][:-1], v_buffers[0][:-1], k_store, v_store)
    with pytest.raises(ValueError, match=r"\[cells, 1, d=64\]"):
        rows.copy_layer(0, k_buffers[0], v_buffers[0], k_store.view(-1, 2, 32), v_store.view(-1, 2, 32))
    with pytest.raises(ValueError, match="one dtype"):
        rows.copy_layer(0, k_buffers[0], v_buffers[0], k_store.bfloat16(), v_store.bfloat16())
    with pytest.raises(ValueError, match="layer must be in"):
        rows.copy_layer(1, k_buffers[0], v_buffers[0], k_store, v_store)
