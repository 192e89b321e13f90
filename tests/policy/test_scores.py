"""Each scoring step of lava.md against a hand-computed case."""

import math

import pytest
import torch

from lava_sglang.policy.scores import (group_query_heads, layer_entropy, pool_scores, value_norm_scale,
                                      window_attention_mass)


def test_window_mask_hides_later_window_keys():
    # n = 3, w = 2, d = 1, one head. Queries and keys are all zero, so every visible key
    # gets the same logit: window query 0 (position 1) sees keys {0, 1}, query 1 sees {0, 1, 2}.
    q = torch.zeros(1, 2, 1)
    k = torch.zeros(1, 3, 1)
    mass = window_attention_mass(q, k, "max")
    # Prefix key 0 gets 1/2 from query 0 and 1/3 from query 1; mean over the window.
    assert mass.shape == (1, 1)
    assert mass[0, 0].item() == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_logits_are_scaled_by_sqrt_head_dim():
    # d = 4, one window query; key 0 has dot product 4 with it, the window key 0.
    q = torch.ones(1, 1, 4)
    k = torch.stack([torch.ones(4), torch.zeros(4)])[None]
    mass = window_attention_mass(q, k, "max")
    expected = math.exp(4 / 2) / (math.exp(4 / 2) + 1)
    assert mass[0, 0].item() == pytest.approx(expected, rel=1e-6)


def test_gqa_max_versus_mean():
    # Two query heads share one KV head; head 0 looks at key 0, head 1 at key 1.
    big = 20.0
    q = torch.tensor([[[big, 0.0]], [[0.0, big]]])  # [Hq=2, w=1, d=2]
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])  # [Hkv=1, n=3, d=2]
    per_head = torch.softmax(torch.tensor([[big, 0.0, 0.0], [0.0, big, 0.0]]) / math.sqrt(2), dim=-1)[:, :2]
    assert torch.allclose(window_attention_mass(q, k, "max")[0], per_head.amax(0))
    assert torch.allclose(window_attention_mass(q, k, "mean")[0], per_head.mean(0))
    with pytest.raises(ValueError, match="gqa_reduce"):
        window_attention_mass(q, k, "sum")


def test_gqa_groups_map_consecutive_query_heads_to_one_kv_head():
    # Hq = 4, Hkv = 2: query heads 0, 1 read KV head 0, heads 2, 3 read KV head 1.
    torch.manual_seed(0)
    q = torch.randn(4, 2, 8)
    k = torch.randn(2, 6, 8)
    mass = window_attention_mass(q, k, "mean")
    for kv_head in range(2):
        expected = window_attention_mass(q[2 * kv_head : 2 * kv_head + 2], k[kv_head : kv_head + 1], "mean")
        assert torch.allclose(mass[kv_head], expected[0])


def test_max_pool_is_same_length_and_padding_never_wins():
    scores = torch.tensor([[-5.0, -1.0, -3.0, -4.0, -9.0, -2.0]])
    pooled = pool_scores(scores, 3)
    # Negative scores at the edges: zero padding would win, -inf padding does not.
    assert pooled.tolist() == [[-1.0, -1.0, -1.0, -3.0, -2.0, -2.0]]
    assert pool_scores(scores, 1) is scores


def test_value_norm_is_l1_over_head_dim_max_over_prefix_only():
    values = torch.tensor([[[1.0, -2.0], [0.5, 0.5], [100.0, 100.0]]])  # the last token is the window
    assert value_norm_scale(values, prefix_len=2).tolist() == [3.0]


def test_entropy_uniform_is_one_and_peaked_is_zero():
    assert layer_entropy(torch.ones(2, 5)) == pytest.approx(1.0)
    peaked = torch.zeros(2, 5)
    peaked[1, 3] = 7.0
    assert layer_entropy(peaked) == pytest.approx(0.0)
    p = torch.tensor([0.5, 0.25, 0.25, 0.0])
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(4)
    assert layer_entropy(p.view(2, 2) * 3) == pytest.approx(expected, rel=1e-6)


def test_entropy_of_a_single_entry_or_no_mass_is_zero():
    assert layer_entropy(torch.tensor([[0.3]])) == 0.0
    assert layer_entropy(torch.zeros(3, 4)) == 0.0


def test_query_heads_are_grouped_by_the_kv_head_they_read():
    # 6 query heads over 2 KV heads: heads 0-2 read KV head 0, heads 3-5 KV head 1.
    per_query_head = torch.arange(6, dtype=torch.float16)[:, None].expand(6, 4)
    grouped = group_query_heads(per_query_head.contiguous(), 2)
    assert grouped.dtype == torch.float32 and grouped.shape == (2, 3, 4)
    assert grouped[:, :, 0].tolist() == [[0, 1, 2], [3, 4, 5]]
    for num_kv_heads in (4, 0):  # 6 heads in 4 groups; no KV head
        with pytest.raises(ValueError, match=f"6 query heads cannot share {num_kv_heads} KV heads"):
            group_query_heads(per_query_head.contiguous(), num_kv_heads)
