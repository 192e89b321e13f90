"""Layer and head budget allocation against hand-computed cases."""

import numpy
import pytest
import torch

from lava_sglang.policy.allocation import (descending_order, descending_order_over_rows, distribute,
                                          flat_topk_head_budgets, global_topk_head_budgets, pyramid_weights)


def test_distribute_floors_proportional_shares():
    assert distribute(10, [1.0, 1.0, 2.0], cap=100) == [2, 2, 5]


def test_distribute_hands_clamped_excess_to_the_others_by_weight():
    # Shares 2, 2, 8; layer 2 clamps at 5 and its excess 3 splits 7 over the other two.
    assert distribute(12, [1.0, 1.0, 4.0], cap=5) == [3, 3, 5]


def test_distribute_repeats_until_nothing_exceeds_the_cap():
    # Layer 2 clamps first, then layer 1, then layer 0: everything ends at the cap.
    assert distribute(20, [1.0, 2.0, 10.0], cap=6) == [6, 6, 6]


def test_distribute_with_zero_weights_shares_equally():
    assert distribute(9, [0.0, 0.0, 0.0], cap=10) == [3, 3, 3]


def test_pyramid_weights_decrease_linearly_and_keep_the_total():
    weights = pyramid_weights(4, 10, beta=20)
    assert weights[0] == pytest.approx(19.5) and weights[-1] == pytest.approx(0.5)
    steps = [a - b for a, b in zip(weights, weights[1:])]
    assert all(step == pytest.approx(steps[0]) and step > 0 for step in steps)
    assert sum(weights) == pytest.approx(40)
    assert pyramid_weights(1, 10, beta=20) == [10.0]


def test_flat_topk_counts_then_safeguard():
    scores = torch.tensor([[9.0, 8.0, 1.0, 0.0], [7.0, 0.5, 0.4, 0.3]])[None]
    # Top 4 of the layer: 9, 8, 7, 1 -> counts [3, 1]; floor(0.2 * 2) = 0.
    assert flat_topk_head_budgets(scores, [2], alpha=0.2) == [[2, 1]]  # round(2.4), round(0.8)
    # alpha = 0.5: floor(0.5 * 2) = 1; round(2.5) = 2 and round(1.5) = 2 (half to even).
    assert flat_topk_head_budgets(scores, [2], alpha=0.5) == [[2, 2]]
    # alpha = 1 ignores the scores: every head gets the layer budget.
    assert flat_topk_head_budgets(scores, [3], alpha=1.0) == [[3, 3]]


def test_the_safeguard_floor_is_taken_of_the_decimal_alpha():
    # 0.29 * 100 is 28.999999999999996 in binary floating point; lava.md's floor(alpha * b) is 29.
    scores = torch.stack([torch.full((200,), 2.0), torch.ones(200)])[None]  # head 0 wins all 200 picks
    assert flat_topk_head_budgets(scores, [100], alpha=0.29) == [[171, 29]]  # round(0.71 * 200 + 29), 29


def test_the_safeguard_rounds_in_the_decimal_alphas_arithmetic():
    # Counts (25, 5), floor(0.34 * 15) = 5: round(0.66 * 25 + 5) = round(21.5) = 22 (half to
    # even); in binary (1 - 0.34) * 25 + 5 is 21.499999999999996, which rounds to 21.
    scores = torch.stack([torch.tensor([2.0] * 25 + [0.0] * 5), torch.tensor([1.0] * 5 + [0.0] * 25)])[None]
    assert flat_topk_head_budgets(scores, [15], alpha=0.34) == [[22, 8]]


def test_flat_topk_takes_each_layer_top_k_in_one_call():
    layer0 = torch.tensor([[9.0, 8.0, 1.0, 0.0], [7.0, 0.5, 0.4, 0.3]])
    layer1 = torch.tensor([[0.1, 0.2, 0.3, 0.4], [5.0, 6.0, 7.0, 8.0]])
    # Layer 0 as above; layer 1 with budget 1: its top 2 (8, 7) are both head 1, and the
    # floor of 0.5 * 1 is 0, so round(0.5 * 0) = 0 and round(0.5 * 2) = 1; layer 2's budget 0
    # keeps nothing.
    scores = torch.stack([layer0, layer1, layer1])
    assert flat_topk_head_budgets(scores, [2, 1, 0], alpha=0.5) == [[2, 2], [0, 1], [0, 0]]


def test_flat_topk_caps_at_the_prefix():
    # A layer budget above the prefix (a direct caller's; the plans clamp theirs at m): top 4
    # of 4 entries, counts [2, 2]; floor(0.5 * 5) = 2 -> round(1 + 2) = 3, capped at m = 2.
    scores = torch.tensor([[[9.0, 8.0], [0.0, 0.1]]])
    assert flat_topk_head_budgets(scores, [5], alpha=0.5) == [[2, 2]]


def test_flat_topk_zero_budget_keeps_nothing():
    assert flat_topk_head_budgets(torch.rand(1, 3, 5), [0], alpha=0.2) == [[0, 0, 0]]


def test_ties_go_to_the_earlier_index():
    assert descending_order(torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0])).tolist() == [1, 2, 4, 0, 3]


def test_global_topk_counts_the_best_entries_wherever_they_are():
    layer0 = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.6]])
    layer1 = torch.tensor([[0.05, 0.02, 0.01], [0.5, 0.95, 0.03]])
    # The best 5 of 12: 0.95 (l1 h1), 0.9 (l0 h0), 0.8, 0.7, 0.6 (l0 h1).
    assert global_topk_head_budgets(torch.stack([layer0, layer1]), 5) == [[1, 3], [0, 1]]
    # More than there are: every entry.
    assert global_topk_head_budgets(torch.stack([layer0, layer1]), 50) == [[3, 3], [3, 3]]


def test_ties_over_rows_go_to_the_earlier_token_then_the_earlier_row():
    scores = torch.tensor([[2.0, 1.0, 1.0], [1.0, 2.0, 0.0]])
    # 2.0 at (row 0, token 0) and (row 1, token 1): token 0 first; then the 1.0s by token.
    assert descending_order_over_rows(scores).tolist() == [0, 4, 3, 1, 2, 5]


def test_forced_sinks_are_spread_over_every_row_at_a_tiny_global_budget():
    # 2 layers x 2 heads, the first 4 tokens forced (+inf, as KVzip's sinks): a budget of 8
    # gives every row its first 2 tokens; ties by row would give the first two rows 4 each.
    scores = torch.rand(2, 2, 10)
    scores[..., :4] = torch.inf
    assert global_topk_head_budgets(scores, 8) == [[2, 2], [2, 2]]
    assert global_topk_head_budgets(scores, 5) == [[2, 1], [1, 1]]


def test_forced_sinks_are_spread_over_a_layers_heads_by_the_per_layer_top_k():
    scores = torch.rand(1, 3, 10)
    scores[..., :4] = torch.inf
    # The layer's top 3 * 1 entries are each head's first token: counts (1, 1, 1), alpha 0.
    assert flat_topk_head_budgets(scores, [1], alpha=0.0) == [[1, 1, 1]]


def test_the_safeguard_does_not_shrink_a_head_below_the_sinks_it_won():
    # A layer budget of 4 per head, the 4 sinks forced in both heads: c = (4, 4), and the
    # safeguard's round(0.8 * 4 + floor(0.2 * 4)) = 3 would drop the fourth sink.
    scores = torch.zeros(1, 2, 20)
    scores[..., :4] = torch.inf
    assert flat_topk_head_budgets(scores, [4], alpha=0.2) == [[4, 4]]
    scores[0, 1, :4] = 1.0  # the same c = (4, 4), the second head's without sinks: its cap stands
    assert flat_topk_head_budgets(scores, [4], alpha=0.2) == [[4, 3]]


def test_layer_shares_are_exact_fractions_of_the_weights():
    # 0.1 * 21 / 0.30000000000000004 is 6.999999999999999 in floats; lava.md's floor(e_l / sum(e) * T) is 7.
    assert distribute(21, [0.1] * 3, cap=100) == [7, 7, 7]


def test_a_numpy_alpha_is_taken_at_its_decimal_value():
    scores = torch.stack([torch.tensor([2.0] * 25 + [0.0] * 5), torch.tensor([1.0] * 5 + [0.0] * 25)])[None]
    for alpha in (numpy.float64(0.34), numpy.float32(0.34)):  # repr is 'np.float64(0.34)' under numpy 2
        assert flat_topk_head_budgets(scores, [15], alpha=alpha) == [[22, 8]]
