"""Attention over compressed prefixes against dense attention, merged with the own tokens."""

import math

import pytest
import torch

from lava_sglang.kernels.attention_states import attention_with_lse, merge_attention_states
from lava_sglang.kernels import launch, prefix_attention
from lava_sglang.kernels.prefix_attention import CompressedPrefixAttention, prefix_attention_reference
from kernel_support import bf16_rounding

LSE_ATOL = 1e-5  # q.k products are exact in fp32 for bf16 inputs too: only summation order differs
FP32_OUT_ATOL = 1e-5


def out_atol(dtype, values, roundings=2):
    """Output tolerance. fp32: summation order only. bf16: each rounding to bf16 on the way
    moves the output (a convex combination of value rows) by at most bf16_rounding * max |v|;
    the kernel has two: the probabilities before the P @ V product, and the output."""
    if dtype == torch.float32:
        return FP32_OUT_ATOL
    return roundings * bf16_rounding(values.device) * float(values.float().abs().max())


def _batch(q_lens, lengths, num_q_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    """A batch over a store: lengths[layer][seq] rows per (request, KV head) sequence, at
    scattered cells; kv_indptr [L, S + 1] with absolute offsets into one kv_indices."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    num_cells = int(lengths.sum()) + 29
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=generator).to(device, dtype)
    k_store = torch.randn(num_cells, 1, head_dim, generator=generator).to(device, dtype)
    v_store = torch.randn(num_cells, 1, head_dim, generator=generator).to(device, dtype)
    kv_indices = torch.randperm(num_cells, generator=generator)[:int(lengths.sum())].to(device, torch.int32)
    kv_indptr = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.flatten().cumsum(0)])
    starts = kv_indptr[:-1].view(lengths.shape)[:, :1]
    kv_indptr = torch.cat([starts, starts + lengths.cumsum(1)], dim=1)  # row l: offsets of layer l
    qo_indptr = torch.tensor([0] + q_lens).cumsum(0)
    return q, k_store, v_store, qo_indptr.to(device), kv_indptr.to(device), kv_indices


def _check(attention, q, k_store, v_store, qo_indptr, kv_indptr, kv_indices, layer=0):
    out, lse = attention.run(q, k_store, v_store, layer=layer)
    expected_out, expected_lse = prefix_attention_reference(
        q, k_store, v_store, qo_indptr, kv_indptr[layer], kv_indices, num_kv_heads=attention.num_kv_heads)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=LSE_ATOL)
    torch.testing.assert_close(out.float(), expected_out, rtol=0, atol=out_atol(q.dtype, v_store))
    return out, lse


# Per (request, KV head) lengths for 3 requests and 2 KV heads: empty, one row, around the
# 64-key block, and long enough for several 64-key splits.
DECODE_LENGTHS = [0, 1, 63, 65, 130, 7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 128])  # 80: not a power of two, the tail of a 128-wide block masked
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_decode_matches_dense_attention(device, group, head_dim, dtype):
    num_kv_heads = 2
    batch = _batch([1, 1, 1], [DECODE_LENGTHS], group * num_kv_heads, num_kv_heads, head_dim, dtype, device,
                   seed=group + head_dim)
    attention = CompressedPrefixAttention(group * num_kv_heads, num_kv_heads, head_dim)
    for keys_per_split in (None, 64):
        attention.plan(*batch[3:], keys_per_split=keys_per_split)
        out, lse = _check(attention, *batch)
    assert attention.max_splits == 3  # 130 keys in chunks of 64: the split merge ran
    # The empty sequence (request 0, KV head 0): lse = -inf and out = 0 for its G heads.
    assert bool(torch.isneginf(lse[0, :group]).all()) and bool((out[0, :group] == 0).all())
    assert bool(torch.isfinite(lse[0, group:]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
def test_extend_every_token_sees_the_whole_prefix(device, group, dtype):
    # 17 tokens x 4 heads = 68 rows: two row tiles of 64.
    num_kv_heads = 2
    batch = _batch([3, 1, 17], [[5, 0, 64, 100, 1, 33]], group * num_kv_heads, num_kv_heads, 64, dtype, device)
    attention = CompressedPrefixAttention(group * num_kv_heads, num_kv_heads, 64)
    attention.plan(*batch[3:], keys_per_split=64)
    _check(attention, *batch)


def test_a_grid_beyond_the_devices_limit_is_refused_before_launch(device, monkeypatch):
    monkeypatch.setattr(launch, "GRID_LIMITS", (1, 65535, 65535))  # one program
    batch = _batch([1, 2], [[3, 70, 0, 12]], 6, 2, 64, torch.float32, device)
    attention = CompressedPrefixAttention(6, 2, 64)
    attention.plan(*batch[3:])
    with pytest.raises(ValueError, match="along the grid's x axis"):
        attention.run(*batch[:3], layer=0)


def test_one_plan_serves_every_layer(device):
    # LAVa gives each layer its own lengths; the split plan is made for the longest of each
    # sequence and reused, layer by layer.
    lengths = [[3, 70, 0, 12], [140, 1, 9, 0], [0, 0, 0, 0]]
    batch = _batch([1, 2], lengths, 6, 2, 64, torch.float32, device)
    attention = CompressedPrefixAttention(6, 2, 64)
    attention.plan(*batch[3:], keys_per_split=64)
    assert attention.num_layers == 3 and attention.max_splits == 3
    for layer in range(3):
        _, lse = _check(attention, *batch, layer=layer)
    assert bool(torch.isneginf(lse).all())  # the last layer keeps nothing


def _dense_over_concatenation(q, prefix_k, prefix_v, own_k, own_v, group, scale):
    """Attention of one request's tokens over [its prefix rows, its own tokens] (causal on the
    own part), per KV head: what the merged result must equal."""
    num_tokens = q.shape[0]
    outs = []
    for head, (pk, pv) in enumerate(zip(prefix_k, prefix_v)):
        keys = torch.cat([pk, own_k[:, head]])[None, None]
        values = torch.cat([pv, own_v[:, head]])[None, None]
        visible = torch.ones(num_tokens, keys.shape[2], dtype=torch.bool, device=q.device)
        visible[:, pk.shape[0]:] = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=q.device).tril()
        query = q[:, head * group:(head + 1) * group].transpose(0, 1)[None, None]
        out, _ = attention_with_lse(query, keys, values, visible, scale)
        outs.append(out[0, 0].transpose(0, 1))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("group", "q_lens"), [(1, [1, 1]), (3, [1, 1]), (8, [1, 1]), (4, [4, 2])])
def test_merged_with_own_tokens_equals_attention_over_the_concatenation(device, group, q_lens, dtype):
    num_kv_heads, head_dim = 2, 64
    num_q_heads = group * num_kv_heads
    batch = _batch(q_lens, [[0, 9, 70, 1]], num_q_heads, num_kv_heads, head_dim, dtype, device, seed=3)
    q, k_store, v_store, qo_indptr, kv_indptr, kv_indices = batch
    generator = torch.Generator().manual_seed(4)
    own_k = torch.randn(q.shape[0], num_kv_heads, head_dim, generator=generator).to(device, dtype)
    own_v = torch.randn(q.shape[0], num_kv_heads, head_dim, generator=generator).to(device, dtype)
    scale = 1.0 / math.sqrt(head_dim)

    attention = CompressedPrefixAttention(num_q_heads, num_kv_heads, head_dim)
    attention.plan(qo_indptr, kv_indptr, kv_indices, keys_per_split=64)
    prefix_out, prefix_lse = attention.run(q, k_store, v_store)
    own_out = torch.empty_like(prefix_out)
    own_lse = torch.empty_like(prefix_lse)
    offsets, kv = qo_indptr.tolist(), kv_indptr[0].tolist()
    expected = []
    for request in range(len(q_lens)):
        tokens = slice(offsets[request], offsets[request + 1])
        grouped = q[tokens].view(-1, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)[None]
        causal = torch.ones(q_lens[request], q_lens[request], dtype=torch.bool, device=device).tril()
        out, lse = attention_with_lse(grouped, own_k[tokens].transpose(0, 1)[None],
                                      own_v[tokens].transpose(0, 1)[None], causal, scale)
        own_out[tokens] = out[0].permute(2, 0, 1, 3).reshape(-1, num_q_heads, head_dim).to(dtype)
        own_lse[tokens] = lse[0].permute(2, 0, 1).reshape(-1, num_q_heads)
        seqs = range(request * num_kv_heads, (request + 1) * num_kv_heads)
        cells = [kv_indices[kv[s]:kv[s + 1]].long() for s in seqs]
        expected.append(_dense_over_concatenation(q[tokens], [k_store[c, 0] for c in cells],
                                                  [v_store[c, 0] for c in cells], own_k[tokens], own_v[tokens],
                                                  group, scale))
    merged = merge_attention_states(prefix_out, prefix_lse, own_out, own_lse)[0].to(dtype)
    # bf16: the kernel's two roundings, the own output's and the merged output's.
    all_values = torch.cat([v_store[:, 0], own_v.flatten(0, 1)])
    torch.testing.assert_close(merged.float(), torch.cat(expected), rtol=0,
                               atol=out_atol(dtype, all_values, roundings=4))


def test_matches_flashinfer_batch_decode(cuda_only):
    # Each (request, KV head) is one FlashInfer sequence with one KV head and G query heads,
    # page size 1, the same kv_indptr / kv_indices. FlashInfer's LSE is base 2. Its handling
    # of empty sequences is not compared: every length here is >= 1.
    flashinfer = pytest.importorskip("flashinfer", reason="flashinfer is not installed")
    num_q_heads, num_kv_heads, head_dim, dtype = 32, 8, 128, torch.bfloat16
    group = num_q_heads // num_kv_heads
    generator = torch.Generator().manual_seed(0)
    batch_size = 4
    lengths = torch.randint(1, 3000, (batch_size * num_kv_heads,), generator=generator).tolist()
    q, k_store, v_store, qo_indptr, kv_indptr, kv_indices = _batch(
        [1] * batch_size, [lengths], num_q_heads, num_kv_heads, head_dim, dtype, cuda_only)
    attention = CompressedPrefixAttention(num_q_heads, num_kv_heads, head_dim)
    attention.plan(qo_indptr, kv_indptr, kv_indices)
    out, lse = attention.run(q, k_store, v_store)

    workspace = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device=cuda_only)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="NHD")
    num_seqs = batch_size * num_kv_heads
    wrapper.plan(kv_indptr[0].to(torch.int32), kv_indices,
                 torch.ones(num_seqs, dtype=torch.int32, device=cuda_only),
                 group, 1, head_dim, 1, q_data_type=dtype, kv_data_type=dtype)
    cache = (k_store.view(-1, 1, 1, head_dim), v_store.view(-1, 1, 1, head_dim))
    fi_out, fi_lse = wrapper.run(q.view(num_seqs, group, head_dim), cache, return_lse=True)
    # Each is within two bf16 roundings of the exact result.
    torch.testing.assert_close(out.float(), fi_out.view_as(out).float(), rtol=0,
                               atol=out_atol(dtype, v_store, roundings=4))
    # q.k products are exact in both; FlashInfer's fast exp2 adds a few fp32 ulps per term.
    torch.testing.assert_close(lse, fi_lse.view_as(lse) * math.log(2.0), rtol=0, atol=1e-4)


def test_bad_inputs_raise(device, monkeypatch):  # on the GPU too: inputs on the device the kernels run on
    q, k_store, v_store, qo_indptr, kv_indptr, kv_indices = _batch([1, 1], [[3, 4, 5, 6]], 4, 2, 64,
                                                                   torch.float32, device)
    attention = CompressedPrefixAttention(4, 2, 64)
    with monkeypatch.context() as patch:  # offsets past int32 (2**31 - 1 here as a small bound) would wrap
        patch.setattr(prefix_attention, "INT32_MAX", kv_indices.numel() - 1)
        with pytest.raises(ValueError, match="the kernels index at most"):
            attention.plan(qo_indptr, kv_indptr, kv_indices)
        patch.setattr(prefix_attention, "INT32_MAX", 1000)  # few entries, but a cell index past the bound
        with pytest.raises(ValueError, match="kv_indices holds 1001; the kernels read cells by int32 index"):
            attention.plan(qo_indptr, kv_indptr, kv_indices.clamp_max(0) + 1001)
    with pytest.raises(ValueError, match="call plan"):
        attention.run(q, k_store, v_store)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        CompressedPrefixAttention(6, 4, 64)
    for sm_scale in (0.0, -0.125, math.nan, math.inf, True, "0.125"):
        with pytest.raises(ValueError, match="sm_scale must be a finite number > 0"):
            CompressedPrefixAttention(4, 2, 64, sm_scale=sm_scale)
    with pytest.raises(ValueError, match="B \\* Hkv \\+ 1 = 5"):
        attention.plan(qo_indptr, kv_indptr[:, :-1], kv_indices)
    with pytest.raises(ValueError, match="non-decreasing offsets"):
        attention.plan(qo_indptr, kv_indptr.flip(1), kv_indices)
    with pytest.raises(ValueError, match="qo_indptr must start at 0"):
        attention.plan(qo_indptr + 1, kv_indptr, kv_indices)
    with pytest.raises(ValueError, match="int32/int64"):
        attention.plan(qo_indptr.float(), kv_indptr, kv_indices)
    with pytest.raises(ValueError, match="keys_per_split"):
        attention.plan(qo_indptr, kv_indptr, kv_indices, keys_per_split=0)
    with monkeypatch.context() as patch:  # the merge's tile bound, patched down to this small batch
        patch.setattr(prefix_attention, "MAX_SPLITS", 5)
        with pytest.raises(ValueError, match="6-key sequence into 6 splits; the merge takes at most 5"):
            attention.plan(qo_indptr, kv_indptr, kv_indices, keys_per_split=1)
        attention.plan(qo_indptr, kv_indptr, kv_indices, keys_per_split=2)
    attention.plan(qo_indptr, kv_indptr, kv_indices)
    with pytest.raises(ValueError, match=r"q must be \[tokens, Hq, d\]"):
        attention.run(q[:1], k_store, v_store)
    with pytest.raises(ValueError, match="largest kv_index"):
        attention.run(q, k_store[:int(kv_indices.max())], v_store)
    with pytest.raises(ValueError, match="q's dtype"):
        attention.run(q, k_store.bfloat16(), v_store.bfloat16())
    with pytest.raises(ValueError, match="layer must be"):
        attention.run(q, k_store, v_store, layer=1)
