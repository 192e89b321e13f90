"""The window-statistics kernel against the policy's torch scores on the same rows: its mass,
scored by the policy (`scores_from_mass`), gives the policy's `layer_scores`."""

import pytest
import torch

from lava_sglang.kernels import launch
from lava_sglang.kernels.window_stats import window_statistics, window_statistics_reference
from lava_sglang.policy import make_policy
from lava_sglang.policy.lava import PAPER_SPEC, Lava
from lava_sglang.policy.scores import value_norm_scale, window_attention_mass
from lava_sglang.policy.snapkv import SnapKV


def paper_lava(window: int) -> Lava:
    """The paper's LAVa (GQA max, pooling 7, value norm)."""
    return make_policy(PAPER_SPEC, window=window)

# The policy upcasts its inputs to fp32 and computes there; the kernel multiplies the same
# values in an fp32 accumulator. For bf16 inputs the products of two bf16 numbers are exact
# in fp32, so in both dtypes the results differ only by the order of fp32 summations and
# the tolerance is the same: a few fp32 ulps of the softmax sums, relative to the scores.
SCORE_RTOL = 2e-5
ENTROPY_ATOL = 1e-5


def _pool_inputs(num_q_heads, num_kv_heads, window, seq_len, head_dim, dtype, device, pool_size=None, seed=0):
    """Window queries, a layer's pool buffers and the document's slots (scattered, not 0..n-1)."""
    generator = torch.Generator().manual_seed(seed)
    pool_size = pool_size or seq_len + 37
    q = torch.randn(num_q_heads, window, head_dim, generator=generator)
    k_buffer = torch.randn(pool_size, num_kv_heads, head_dim, generator=generator)
    v_buffer = torch.randn(pool_size, num_kv_heads, head_dim, generator=generator)
    slots = torch.randperm(pool_size, generator=generator)[:seq_len]
    return [t.to(device=device, dtype=dtype) for t in (q, k_buffer, v_buffer)] + [slots.to(device)]


def _gathered(k_buffer, v_buffer, slots):
    """[Hkv, n, d] rows of the document, as the policy takes them."""
    return k_buffer[slots].transpose(0, 1), v_buffer[slots].transpose(0, 1)


def _kernel_scores(policy, q, k_buffer, v_buffer, slots, **options):
    """The policy's scores from the kernel's mass, as the server plans (`plan_prefix`)."""
    stats = window_statistics(q, k_buffer, v_buffer, slots, gqa_reduce=policy.gqa_reduce, **options)
    return policy.scores_from_mass(stats.mass, v_buffer[slots].transpose(0, 1).float())


def _assert_scores_close(actual, expected):
    # Relative to the largest finite score: forced sinks score inf, in both or the test fails.
    scale = float(expected[torch.isfinite(expected)].abs().max())
    torch.testing.assert_close(actual, expected, rtol=SCORE_RTOL, atol=SCORE_RTOL * scale)


# (GQA group, head dim): groups 1, 3, 4, 8 at every head dim. Window 13 and prefixes that are
# not multiples of the 64-key block; keys_per_split=41 makes the last split, keys [82, 93),
# start inside the window (keys [80, 93)), where the first two window rows see no key of it.
SHAPES = [(group, head_dim) for group in (1, 3, 4, 8) for head_dim in (64, 80, 128)]  # 80: a masked block tail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("group", "head_dim"), SHAPES)
def test_matches_policy_lava_and_snapkv(device, group, head_dim, dtype):
    num_kv_heads, window, seq_len = 2, 13, 93
    q, k_buffer, v_buffer, slots = _pool_inputs(group * num_kv_heads, num_kv_heads, window, seq_len, head_dim,
                                                dtype, device, seed=group * head_dim)
    keys, values = _gathered(k_buffer, v_buffer, slots)
    # The default lava, the paper's (pooling, value norm), SnapKV (mean), kvzip (forced sinks).
    for policy in (Lava(window=window), paper_lava(window), SnapKV(window=window),
                   make_policy("kvzip", window=window)):
        expected = policy.layer_scores(q, keys, values)
        actual = _kernel_scores(policy, q, k_buffer, v_buffer, slots, keys_per_split=41)
        assert actual.scores.shape == (num_kv_heads, seq_len - window)
        _assert_scores_close(actual.scores, expected.scores)
        assert actual.entropy == pytest.approx(expected.entropy, abs=ENTROPY_ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mass_and_value_norm(device, dtype):
    q, k_buffer, v_buffer, slots = _pool_inputs(6, 2, 9, 77, 64, dtype, device)
    # The mass over 32-key splits (combined by their row maxima and sums); vbar from its own key blocks.
    stats = window_statistics(q, k_buffer, v_buffer, slots, gqa_reduce="max", with_value_norm=True,
                              keys_per_split=32)
    expected = window_statistics_reference(q, k_buffer, v_buffer, slots, gqa_reduce="max", with_value_norm=True)
    _assert_scores_close(stats.mass, expected.mass)
    # vbar is a max of L1 norms: sums of |v| in fp32, the same in both.
    torch.testing.assert_close(stats.value_norm, expected.value_norm, rtol=1e-6, atol=0)
    snap = window_statistics(q, k_buffer, v_buffer, slots, gqa_reduce="mean")
    assert snap.value_norm is None
    _assert_scores_close(snap.mass, window_statistics_reference(q, k_buffer, v_buffer, slots, gqa_reduce="mean").mass)


def test_a_grid_beyond_the_devices_limit_is_refused_before_launch(device, monkeypatch):
    monkeypatch.setattr(launch, "GRID_LIMITS", (2**31 - 1, 65535, 1))  # one split at most
    q, k_buffer, v_buffer, slots = _pool_inputs(4, 2, 5, 200, 64, torch.float32, device)
    with pytest.raises(ValueError, match="needs 4 programs along the grid's z axis"):
        window_statistics(q, k_buffer, v_buffer, slots, keys_per_split=64)


def test_window_queries_read_through_their_strides(device):
    # The compressor passes a [w, Hq, d] capture transposed: strides (d, Hq * d, 1), not contiguous.
    q, k_buffer, v_buffer, slots = _pool_inputs(6, 2, 9, 77, 64, torch.float32, device)
    strided = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(strided, q) and not strided.is_contiguous()
    for gqa_reduce in ("max", "mean"):
        expected = window_statistics(q, k_buffer, v_buffer, slots, gqa_reduce=gqa_reduce, keys_per_split=32)
        actual = window_statistics(strided, k_buffer, v_buffer, slots, gqa_reduce=gqa_reduce, keys_per_split=32)
        torch.testing.assert_close(actual.mass, expected.mass, rtol=0, atol=0)


@pytest.mark.parametrize(("window", "seq_len"), [(1, 2), (5, 6), (16, 17), (1, 130), (32, 161)])
def test_edge_lengths(device, window, seq_len):
    # Prefix of 1 token, window of 1 query, and lengths across the 64-key blocks.
    q, k_buffer, v_buffer, slots = _pool_inputs(4, 2, window, seq_len, 64, torch.float32, device)
    policy = paper_lava(window)
    expected = policy.layer_scores(q, *_gathered(k_buffer, v_buffer, slots))
    for keys_per_split in (None, 7):
        actual = _kernel_scores(policy, q, k_buffer, v_buffer, slots, keys_per_split=keys_per_split)
        _assert_scores_close(actual.scores, expected.scores)
        assert actual.entropy == pytest.approx(expected.entropy, abs=ENTROPY_ATOL)


def test_a_window_longer_than_a_row_tile_is_read_tile_by_tile(device, monkeypatch):
    # Both passes cut the window's rows into tiles of at most MAX_BLOCK_ROWS (shared memory
    # bounds a tile, not --kv-window); 8-row tiles here stand in for 128-row ones.
    from lava_sglang.kernels import window_stats

    monkeypatch.setattr(window_stats, "MAX_BLOCK_ROWS", 8)
    q, k_buffer, v_buffer, slots = _pool_inputs(4, 2, 21, 90, 64, torch.float32, device)
    policy = paper_lava(21)
    expected = policy.layer_scores(q, *_gathered(k_buffer, v_buffer, slots))
    actual = _kernel_scores(policy, q, k_buffer, v_buffer, slots, keys_per_split=30)
    _assert_scores_close(actual.scores, expected.scores)


def test_bad_inputs_raise(device):  # on the GPU too: inputs on the device the kernels run on
    q, k_buffer, v_buffer, slots = _pool_inputs(4, 2, 8, 30, 64, torch.float32, device)
    cases = {
        "need 1 <= w < n": (q, k_buffer, v_buffer, slots[:8]),  # no prefix: nothing to score
        "not a multiple": (q[:3], k_buffer, v_buffer, slots),
        "one dtype": (q.bfloat16(), k_buffer, v_buffer, slots),
        "one shape": (q, k_buffer, v_buffer[:, :1], slots),
        "slots must lie in": (q, k_buffer, v_buffer, slots + k_buffer.shape[0]),
        "slots must have dtype": (q, k_buffer, v_buffer, slots.float()),
        "head dim": (q[..., :32], k_buffer, v_buffer, slots),
    }
    for message, args in cases.items():
        with pytest.raises(ValueError, match=message):
            window_statistics(*args)
    with pytest.raises(ValueError, match="gqa_reduce"):
        window_statistics(q, k_buffer, v_buffer, slots, gqa_reduce="sum")
    with pytest.raises(ValueError, match="keys_per_split"):
        window_statistics(q, k_buffer, v_buffer, slots, keys_per_split=0)


def test_long_document_reads_the_pool_in_place(cuda_only):
    # Llama-3-8B layer shape, a 32K-token document: the statistics need O(Hq * w + Hkv * m)
    # memory, far less than one gathered copy of the document's keys.
    num_kv_heads, head_dim, window, seq_len = 8, 128, 32, 32768
    q, k_buffer, v_buffer, slots = _pool_inputs(32, num_kv_heads, window, seq_len, head_dim, torch.bfloat16, cuda_only)
    keys, values = _gathered(k_buffer, v_buffer, slots)
    expected = window_attention_mass(q, keys, "max")
    expected_value_norm = value_norm_scale(values, seq_len - window)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    stats = window_statistics(q, k_buffer, v_buffer, slots, with_value_norm=True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    gathered_keys_bytes = num_kv_heads * seq_len * head_dim * 2
    assert extra < gathered_keys_bytes / 4, f"peak extra memory {extra} B"
    _assert_scores_close(stats.mass, expected)
    torch.testing.assert_close(stats.value_norm, expected_value_norm, rtol=1e-5, atol=0)
