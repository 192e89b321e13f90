"""compress_plan: budgets, invariants, each policy's choice, the streaming form, bad input."""

import dataclasses
import math

import numpy
import pytest
import torch

from lava_sglang.policy import (POLICIES, PlanBuilder, PlanRefused, compress_plan, make_observe, make_policy,
                                resolve_budget, spec_of)
from lava_sglang.policy.base import LayerScores
from lava_sglang.policy.lava import PAPER_SPEC
from lava_sglang.policy.scores import layer_entropy, pool_scores, window_attention_mass

SCORED = ["lava", "kvzip", "snapkv", "ada_snapkv", "pyramidkv"]


def random_layers(num_layers=3, num_q_heads=6, num_kv_heads=2, seq_len=40, window=8, head_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = [torch.randn(num_q_heads, min(window, seq_len), head_dim, generator=gen) for _ in range(num_layers)]
    k = [torch.randn(num_kv_heads, seq_len, head_dim, generator=gen) for _ in range(num_layers)]
    v = [torch.randn(num_kv_heads, seq_len, head_dim, generator=gen) for _ in range(num_layers)]
    return q, k, v


@pytest.mark.parametrize("ratio, seq_len, expected", [(0.2, 2000, 400), (1.0, 7, 7), (0.1, 33, 4), (0.5, 1, 1)])
def test_ratio_budget_is_ceil_of_the_decimal_ratio(ratio, seq_len, expected):
    assert resolve_budget(ratio, seq_len) == expected


def test_a_numpy_ratio_is_taken_at_its_own_decimal_value():
    # float(np.float32(0.2)) is 0.20000000298..., whose ceil of 2000 would be 401.
    assert resolve_budget(numpy.float32(0.2), 2000) == 400
    assert resolve_budget(numpy.float64(0.2), 2000) == 400


@pytest.mark.parametrize("bad", [-1, 5.0, "0.2"])
def test_the_full_cache_refuses_a_bad_budget_too(bad):
    q, k, v = random_layers(num_layers=1)
    with pytest.raises(ValueError, match="budget"):
        compress_plan("full", q, k, v, bad)


def test_int_budget_is_tokens():
    assert resolve_budget(17, 1000) == 17


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, math.nan, math.inf, 0, -3, True, "0.2", None])
def test_bad_budget_names_the_argument(bad):
    with pytest.raises(ValueError, match="budget"):
        resolve_budget(bad, 100)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_budget_at_least_n_keeps_everything(policy):
    q, k, v = random_layers(seq_len=40)
    for budget in (1.0, 40, 1000):
        plan = compress_plan(policy, q, k, v, budget, window=8)
        assert all(torch.equal(pos, torch.arange(40)) for layer in plan.kept for pos in layer)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_sequence_no_longer_than_the_window_keeps_everything(policy):
    q, k, v = random_layers(seq_len=6, window=8)
    plan = compress_plan(policy, q, k, v, 0.1, window=8)
    assert plan.window == 6
    assert all(torch.equal(pos, torch.arange(6)) for layer in plan.kept for pos in layer)


@pytest.mark.parametrize("policy", [p for p in sorted(POLICIES) if p != "full"])
def test_budget_at_most_the_window_keeps_only_the_window(policy):
    q, k, v = random_layers(seq_len=40, window=8)
    plan = compress_plan(policy, q, k, v, 8, window=8)
    assert all(torch.equal(pos, torch.arange(32, 40)) for layer in plan.kept for pos in layer)


@pytest.mark.parametrize("policy", SCORED + ["streamingllm"])
@pytest.mark.parametrize("group", [1, 3])
def test_invariants_window_kept_sorted_unique_and_total_within_rounding(policy, group):
    num_layers, num_kv_heads, seq_len, window, budget = 4, 2, 64, 8, 24
    q, k, v = random_layers(num_layers, group * num_kv_heads, num_kv_heads, seq_len, window)
    plan = compress_plan(policy, q, k, v, budget, window=window)
    window_positions = set(range(seq_len - window, seq_len))
    for layer, head_budgets in zip(plan.kept, plan.head_budgets):
        for positions, head_budget in zip(layer, head_budgets):
            assert positions.dtype == torch.int64
            assert torch.all(positions[1:] > positions[:-1])
            assert window_positions <= set(positions.tolist())
            assert 0 <= positions.min() and positions.max() < seq_len
            assert len(positions) == head_budget + window
    target = num_layers * num_kv_heads * budget
    # Layer budgets are floored (under one token per layer and head lost), the safeguard's floor
    # loses under one more and each head cap is rounded (half a token either way): docs/lava.md.
    assert target - num_layers * num_kv_heads * 2.5 <= plan.kept_rows <= target + num_layers * num_kv_heads * 0.5
    assert sum(plan.layer_budgets) <= num_layers * (budget - window)


def test_snapkv_keeps_each_heads_top_pooled_mean_scores():
    q, k, v = random_layers(num_layers=1, num_q_heads=4, num_kv_heads=2, seq_len=30, window=6)
    plan = compress_plan("snapkv", q, k, v, 10, window=6, pool_kernel=3)
    scores = pool_scores(window_attention_mass(q[0], k[0], "mean"), 3)
    for head in range(2):
        best = torch.sort(scores[head], descending=True, stable=True).indices[:4]
        expected = set(best.tolist()) | set(range(24, 30))
        assert set(plan.kept[0][head].tolist()) == expected
    assert plan.head_budgets == [[4, 4]]


def two_head_layer(value_scale_head0, value_scale_head1, seq_len=20, window=2):
    """Head 0's window attends evenly to tokens 0-7 (1/8 each), head 1's to every token (1/20)."""
    head_dim = 4
    q = torch.zeros(2, window, head_dim)
    q[0, :, 0] = 30.0
    k = torch.zeros(2, seq_len, head_dim)
    k[0, :8, 0] = 1.0
    v = torch.ones(2, seq_len, head_dim)
    v[0] *= value_scale_head0
    v[1] *= value_scale_head1
    return [q], [k], [v]


def test_lava_value_norm_moves_budget_to_the_head_with_large_values():
    # By attention alone head 0's eight tokens win the layer's top-8; LAVa scales head 1 by
    # its 100x larger value norm, and head 1 takes the whole budget instead.
    q, k, v = two_head_layer(value_scale_head0=0.01, value_scale_head1=1.0)
    ada = compress_plan("ada_snapkv", q, k, v, 6, window=2, pool_kernel=1, alpha=0.0)
    lava = compress_plan(PAPER_SPEC + ",pool_kernel=1,alpha=0", q, k, v, 6, window=2)
    assert ada.head_budgets == [[8, 0]]
    assert lava.head_budgets == [[0, 8]]
    assert ada.kept[0][0].tolist() == list(range(8)) + [18, 19]


def test_lava_uses_max_over_the_query_group():
    # One query head of the group attends to token 5; the other is flat. Max keeps the peak.
    head_dim, seq_len, window = 4, 16, 2
    q = torch.zeros(2, window, head_dim)
    q[0, :, 0] = 40.0
    k = torch.zeros(1, seq_len, head_dim)
    k[0, 5, 0] = 1.0
    v = torch.ones(1, seq_len, head_dim)
    plan = make_policy(PAPER_SPEC + ",pool_kernel=1", window=window)
    scores = plan.layer_scores(q, k, v).scores
    expected = window_attention_mass(q, k, "max") * v[:, :-window].abs().sum(-1).amax(-1, keepdim=True)
    assert torch.allclose(scores, expected)
    assert scores[0, 5] > 0.9 * head_dim


def test_lava_gives_more_budget_to_the_layer_with_higher_entropy():
    seq_len, window, head_dim = 40, 4, 8
    flat_q = torch.zeros(2, window, head_dim)  # every prefix key gets equal mass
    peaked_q = torch.zeros(2, window, head_dim)
    peaked_q[:, :, 0] = 50.0
    k = torch.zeros(1, seq_len, head_dim)
    k[0, 7, 0] = 1.0
    v = torch.ones(1, seq_len, head_dim)
    plan = compress_plan(PAPER_SPEC + ",pool_kernel=1", [flat_q, peaked_q], [k, k], [v, v], 12, window=window)
    assert plan.layer_entropy[0] == pytest.approx(1.0, abs=1e-5)
    assert plan.layer_entropy[1] < 0.1
    assert plan.layer_budgets[0] > plan.layer_budgets[1]
    total = 2 * (12 - window)
    weights = plan.layer_entropy
    assert plan.layer_budgets[1] == math.floor(weights[1] / sum(weights) * total)


def test_lava_layer_budgets_clamp_at_the_prefix_and_hand_the_rest_on():
    q, k, v = random_layers(num_layers=3, num_q_heads=2, num_kv_heads=1, seq_len=20, window=4)
    q[0] = torch.zeros_like(q[0])  # uniform attention: entropy 1
    for layer in (1, 2):  # every query looks at one key: entropy 0
        q[layer] = (k[layer][0, layer] * 50).expand_as(q[layer]).clone()
    plan = compress_plan(PAPER_SPEC + ",pool_kernel=1", q, k, v, 15, window=4)
    assert plan.layer_entropy[0] == pytest.approx(1.0) and max(plan.layer_entropy[1:]) < 1e-6
    # Layer 0's share (all 33 selectable rows) is clamped at its m = 16; the other layers,
    # whose entropy share is 0, get the rest (less the floors' rounding).
    assert plan.layer_budgets[0] == 16
    assert min(plan.layer_budgets[1:]) > 0 and sum(plan.layer_budgets) >= 3 * 11 - 2


def test_pyramidkv_gives_early_layers_more():
    q, k, v = random_layers(num_layers=4, seq_len=100, window=4)
    plan = compress_plan("pyramidkv", q, k, v, 24, window=4)
    assert plan.layer_budgets == sorted(plan.layer_budgets, reverse=True)
    assert plan.layer_budgets[0] > 20 > plan.layer_budgets[-1]
    assert sum(plan.layer_budgets) in range(4 * 20 - 4, 4 * 20 + 1)


def test_streamingllm_keeps_sinks_and_the_most_recent_tokens():
    q, k, v = random_layers(seq_len=50, window=8)
    plan = compress_plan("streamingllm", q, k, v, 20, window=8)
    expected = list(range(4)) + list(range(34, 50))
    assert all(pos.tolist() == expected for layer in plan.kept for pos in layer)
    assert math.isnan(plan.layer_entropy[0])


def test_full_ignores_the_budget():
    q, k, v = random_layers(seq_len=50, window=8)
    plan = compress_plan("full", q, k, v, 0.1, window=8)
    assert plan.kept_rows == 3 * 2 * 50 and plan.keep_ratio == 1.0


def test_ties_keep_the_earliest_tokens():
    seq_len, window = 20, 4
    q = [torch.zeros(1, window, 4)]
    k = [torch.zeros(1, seq_len, 4)]
    v = [torch.ones(1, seq_len, 4)]
    plan = compress_plan("snapkv", q, k, v, 9, window=window, pool_kernel=1)
    assert plan.kept[0][0].tolist() == list(range(5)) + list(range(16, 20))


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_streaming_builder_with_precomputed_scores_gives_the_same_plan(policy):
    q, k, v = random_layers(num_layers=3, seq_len=48, window=8)
    direct = compress_plan(policy, q, k, v, 0.3, window=8)
    policy_obj = make_policy(policy, window=8)
    builder = PlanBuilder(policy_obj, 0.3, seq_len=48, num_layers=3, num_kv_heads=2)
    for layer_q, layer_k, layer_v in zip(q, k, v):
        if builder.needs_queries:
            builder.add_layer_scores(policy_obj.layer_scores(layer_q, layer_k, layer_v))
        else:
            builder.add_layer(layer_q, layer_k, layer_v)
    streamed = builder.finish()
    assert streamed.layer_budgets == direct.layer_budgets
    assert streamed.head_budgets == direct.head_budgets
    assert all(torch.equal(a, b) for la, lb in zip(streamed.kept, direct.kept) for a, b in zip(la, lb))


def test_streaming_builder_takes_layer_scores_not_a_bare_tensor():
    builder = PlanBuilder(make_policy("lava", window=8), 0.3, seq_len=48, num_layers=1, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"takes a LayerScores\(scores, entropy\), got Tensor"):
        builder.add_layer_scores(torch.ones(2, 40))


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_streaming_builder_refuses_scores_that_would_sort_wrongly(bad):
    # A nan score would be kept before every real one (and before +inf, the forced sinks).
    builder = PlanBuilder(make_policy("kvzip", window=8), 0.3, seq_len=48, num_layers=1, num_kv_heads=2)
    scores = torch.rand(2, 40)
    scores[1, 17] = bad
    with pytest.raises(ValueError, match="scores of layer 0 contain nan or -inf"):
        builder.add_layer_scores(LayerScores(scores, 0.5))
    scores[1, 17] = math.inf  # a forced sink
    builder.add_layer_scores(LayerScores(scores, 0.5))
    assert 17 in builder.finish().kept[0][1].tolist()


@pytest.mark.parametrize("policy", ["lava", "snapkv", "ada_snapkv", "lava:layer_budget=entropy"])
def test_scores_that_overflow_from_finite_inputs_are_refused(policy):
    # Finite, but q.k overflows fp32: the head's scores become nan, which would win every row of its layer.
    torch.manual_seed(0)
    queries, keys, values = torch.randn(2, 4, 8), torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    keys[0, 3] = 1e30
    queries[0, 1] = 1e10
    with pytest.raises(PlanRefused, match="the scores computed from the observation contain nan"):
        compress_plan(policy, [queries], [keys], [values], 8, window=4)
    keys[0, 3] = 1.0
    compress_plan(policy, [queries], [keys], [values], 8, window=4)


@pytest.mark.parametrize("entropy", [math.nan, -1.0, 1.5, True])
def test_streaming_builder_refuses_an_entropy_outside_0_1_where_it_sets_layer_budgets(entropy):
    # Entropies [-1, 1, 1] over a total of 30 would give budgets [-30, 30, 30]: twice the whole.
    scores = LayerScores(torch.rand(2, 40), entropy)
    with pytest.raises(ValueError, match=f"the entropy of layer 0 is {entropy!r}, not a normalised entropy"):
        PlanBuilder(make_policy(PAPER_SPEC, window=8), 0.3, seq_len=48, num_layers=1,
                    num_kv_heads=2).add_layer_scores(scores)
    PlanBuilder(make_policy("lava", window=8), 0.3, seq_len=48, num_layers=1, num_kv_heads=2).add_layer_scores(scores)


def test_a_numpy_entropy_sets_the_layer_budgets_as_a_python_float_does():
    layers = [torch.rand(2, 40, generator=torch.Generator().manual_seed(layer)) for layer in range(3)]
    plans = []
    for entropy in (float, numpy.float32):
        builder = PlanBuilder(make_policy(PAPER_SPEC, window=8), 0.3, seq_len=48, num_layers=3, num_kv_heads=2)
        for layer, scores in enumerate(layers):
            builder.add_layer_scores(LayerScores(scores, entropy(0.25 * (layer + 1))))
        plans.append([[positions.tolist() for positions in heads] for heads in builder.finish().kept])
    assert plans[0] == plans[1]


def test_a_uniform_layers_entropy_is_at_most_1_whatever_the_rounding():
    # Unclamped, fp32 gives up to 1.0000007 on some of these sizes.
    assert all(0.0 <= layer_entropy(torch.full((entries,), 1.0 / 3)) <= 1.0 for entries in range(2, 5000, 7))


def test_low_precision_inputs_are_scored_in_fp32():
    q, k, v = random_layers(num_layers=2, seq_len=40, window=8)
    half = compress_plan("lava", [t.bfloat16() for t in q], [t.bfloat16() for t in k], [t.bfloat16() for t in v],
                         0.4, window=8)
    assert math.isfinite(half.layer_entropy[0])
    expected = layer_entropy(make_policy("lava", window=8).layer_scores(
        q[0].bfloat16().float(), k[0].bfloat16().float(), v[0].bfloat16().float()).scores)
    assert half.layer_entropy[0] == pytest.approx(expected, rel=1e-6)


def test_kvzip_keeps_the_best_scores_of_all_layers_and_heads_and_the_sinks():
    # One global threshold: a layer whose window attention is peaked on a few tokens keeps
    # those, the flat layer keeps only what beats them; the first 4 tokens are always kept.
    q, k, v = random_layers(num_layers=3, num_q_heads=4, num_kv_heads=2, seq_len=40, window=8)
    q[1] = q[1] * 8.0  # layer 1's attention is peaked: its best tokens beat everything else
    policy = make_policy("kvzip", window=8)
    plan = compress_plan(policy, q, k, v, 16, window=8)
    scores = [policy.layer_scores(*layer).scores for layer in zip(q, k, v)]
    flat = torch.stack(scores).flatten()
    threshold = torch.sort(flat, descending=True).values[3 * 2 * 8 - 1]
    for layer, heads in enumerate(plan.kept):
        for head, positions in enumerate(heads):
            selected = set(positions.tolist()) - set(range(32, 40))
            expected = set(torch.nonzero(scores[layer][head] >= threshold).flatten().tolist())
            assert selected == expected
            assert {0, 1, 2, 3} <= selected
    assert sum(map(sum, plan.head_budgets)) == 3 * 2 * 8
    assert plan.head_budgets[1] != plan.head_budgets[0]


def test_kvzip_at_a_budget_below_its_sinks_keeps_the_first_token_in_every_layer_and_head():
    # 3 layers x 2 heads x 4 sinks need 24 selectable tokens; 9 tokens per row, 8 of them the
    # window, give 6: every (layer, head) keeps token 0, none a second sink before all have one.
    q, k, v = random_layers(num_layers=3, num_q_heads=4, num_kv_heads=2, seq_len=40, window=8)
    plan = compress_plan(make_policy("kvzip", window=8), q, k, v, 9, window=8)
    assert plan.head_budgets == [[1, 1]] * 3
    assert all(set(positions.tolist()) == {0} | set(range(32, 40)) for heads in plan.kept for positions in heads)


def test_kvzip_scores_are_the_raw_group_max_with_sinks_forced():
    q, k, v = random_layers(num_layers=1, num_q_heads=4, num_kv_heads=2, seq_len=30, window=6)
    scores = make_policy("kvzip", window=6).layer_scores(q[0], k[0], v[0]).scores
    mass = window_attention_mass(q[0], k[0], "max")
    assert torch.isinf(scores[:, :4]).all()
    torch.testing.assert_close(scores[:, 4:], mass[:, 4:])


def test_lava_global_budget_is_one_threshold_over_lava_scores():
    q, k, v = random_layers(num_layers=3, num_q_heads=4, num_kv_heads=2, seq_len=40, window=8)
    paper = make_policy(PAPER_SPEC + ",pool_kernel=1", window=8)  # unpooled: no ties at the threshold
    plan = compress_plan(make_policy(PAPER_SPEC + ",layer_budget=global,pool_kernel=1", window=8), q, k, v, 16)
    scores = torch.stack([paper.layer_scores(*layer).scores for layer in zip(q, k, v)])
    counts = (scores >= torch.sort(scores.flatten(), descending=True).values[47]).sum(-1)
    assert plan.head_budgets == counts.tolist()


def test_lava_ablation_switches():
    q, k, v = two_head_layer(value_scale_head0=0.01, value_scale_head1=1.0)
    no_norm = compress_plan(make_policy(PAPER_SPEC + ",value_norm=false,alpha=0,pool_kernel=1", window=2),
                            q, k, v, 6)
    assert no_norm.head_budgets == [[8, 0]]  # as Ada-SnapKV: attention alone decides
    even = compress_plan(make_policy(PAPER_SPEC + ",head_budget=uniform,pool_kernel=1", window=2), q, k, v, 6)
    assert even.head_budgets == [[4, 4]]
    q, k, v = random_layers(num_layers=3)
    uniform = compress_plan(make_policy("lava:layer_budget=uniform", window=8), q, k, v, 16)
    assert uniform.layer_budgets == [8, 8, 8]


def test_lava_defaults_are_the_measured_best_and_the_paper_is_a_spec():
    # docs/allocation.md: on repetition scores, one global threshold over the raw scores.
    default, paper = make_policy("lava"), make_policy(PAPER_SPEC)
    assert (default.layer_budget, default.value_norm, default.pool_kernel) == ("global", False, 1)
    assert (paper.layer_budget, paper.value_norm, paper.pool_kernel, paper.alpha) == ("entropy", True, 7, 0.2)
    q, k, v = random_layers(num_layers=3)
    kvzip = compress_plan(make_policy("kvzip:sink_tokens=0", window=8), q, k, v, 16)
    assert compress_plan("lava", q, k, v, 16, window=8).head_budgets == kvzip.head_budgets


@pytest.mark.parametrize("spec", sorted(POLICIES) + [PAPER_SPEC, "kvzip:sink_tokens=0,window=8"])
def test_a_policys_spec_of_builds_the_same_policy_whatever_the_defaults(spec):
    policy = make_policy(spec)
    spelled_out = spec_of(policy)
    assert make_policy(spelled_out) == policy
    fields = [field.name for field in dataclasses.fields(policy)]
    assert all(f"{name}=" in spelled_out for name in fields)  # every field, defaults included


def test_policy_specs_set_fields_and_name_what_is_wrong():
    policy = make_policy("lava:layer_budget=entropy,value_norm=false,alpha=0", window=8, alpha=0.5)
    assert (policy.layer_budget, policy.value_norm, policy.alpha, policy.window) == ("entropy", False, 0, 8)
    # One threshold over every layer and head reads no per-layer option: setting one is refused.
    for options, message in (("alpha=0.5", "alpha=0.5 is read only by the per-layer head top-k"),
                             ("head_budget=uniform", "head_budget=uniform needs per-layer budgets"),
                             ("layer_budget=entropy,head_budget=uniform,alpha=0", "alpha=0 is read only by")):
        with pytest.raises(ValueError, match=message):
            make_policy(f"lava:{options}")
    with pytest.raises(ValueError, match="alpha=0.5 is read only by"):  # the server's --kv-alpha 0.5
        make_policy("lava", alpha=0.5)
    assert [make_policy(spec).reads_alpha for spec in ("lava", PAPER_SPEC, "lava:layer_budget=uniform",
                                                       "ada_snapkv", "snapkv", "kvzip")] == [
        False, True, True, True, False, False]
    with pytest.raises(ValueError, match="options must be field=value with a field of lava"):
        make_policy("lava:budget=2")
    for name in ("entropic", "nan"):  # "nan" is a float, but not for a field that takes a name
        with pytest.raises(ValueError, match=f"layer_budget must be one of .*, got '{name}'"):
            make_policy(f"lava:layer_budget={name}")
    with pytest.raises(ValueError, match="value_norm must be a bool"):
        make_policy("lava:value_norm=1")
    with pytest.raises(ValueError, match="sink_tokens must be an int >= 0"):
        make_policy("kvzip:sink_tokens=-1")
    # Numbers as written: int() would read 3_2 as 32 and " 8 " as 8.
    assert make_policy("lava:window=+8,pool_kernel=3").window == 8 and make_policy("pyramidkv:beta=2.5e1").beta == 25
    for typo in ("3_2", " 8 ", "8.0.0", "\uff18"):  # the last a fullwidth 8
        with pytest.raises(ValueError, match=f"window must be an int >= 1, got '{typo}'"):
            make_policy(f"lava:window={typo}")
    # No option takes an infinite number (pyramidkv's beta did), nor nan.
    for value in ("inf", "-inf", "nan"):
        with pytest.raises(ValueError, match=f"beta must be a finite number, got '{value}'"):
            make_policy(f"pyramidkv:beta={value}")
    with pytest.raises(ValueError, match="beta must be a finite number >= 1, got inf"):  # nor through the API
        make_policy("pyramidkv", beta=math.inf)
    # numpy's numbers are numbers: a float32 alpha is taken at its decimal value (allocation).
    assert make_policy("ada_snapkv", alpha=numpy.float32(0.34)).alpha == numpy.float32(0.34)
    # and a float32 beta splits the layers as a float does (float32 weights floored 12 and 4 here, not 11 and 3)
    budgets = [make_policy("pyramidkv", beta=beta).layer_budgets([0.0] * 16, 128, 10**6)
               for beta in (numpy.float32(2.0), 2.0)]
    assert budgets[0] == budgets[1] and (budgets[1][0], budgets[1][-1]) == (11, 3)
    with pytest.raises(ValueError, match="alpha must be a number in"):
        make_policy("ada_snapkv", alpha=True)
    # A shared option is taken by the policies that have it; one that none has is a misspelling.
    assert make_policy("streamingllm", window=8, pool_kernel=3).window == 8
    with pytest.raises(ValueError, match="policy options aplha: no policy has them"):
        make_policy("ada_snapkv", aplha=0.5)
    with pytest.raises(ValueError, match="observe options chunk_token: no observe has them"):
        make_observe("reconstruct", chunk_token=128)


class TestBadInput:
    def test_unknown_policy_lists_the_valid_ones(self):
        q, k, v = random_layers()
        with pytest.raises(ValueError, match=r"policy must be one of \['ada_snapkv', 'full', 'kvzip', 'lava'"):
            compress_plan("h2o", q, k, v, 0.5)

    def test_layer_counts_must_match(self):
        q, k, v = random_layers(num_layers=3)
        with pytest.raises(ValueError, match="one entry per layer"):
            compress_plan("lava", q[:2], k, v, 0.5, window=8)

    def test_empty_or_tensor_instead_of_a_list(self):
        q, k, v = random_layers()
        with pytest.raises(ValueError, match="keys must be a non-empty sequence"):
            compress_plan("lava", q, [], v, 0.5, window=8)
        with pytest.raises(ValueError, match="q_window must be a non-empty sequence"):
            compress_plan("lava", q[0], k, v, 0.5, window=8)

    def test_query_heads_must_be_a_multiple_of_kv_heads(self):
        q, k, v = random_layers(num_q_heads=5, num_kv_heads=2)
        with pytest.raises(ValueError, match="Hq=5, not a multiple of Hkv=2"):
            compress_plan("lava", q, k, v, 0.5, window=8)

    def test_no_query_heads_or_an_empty_head_dim_is_refused(self):
        # Unchecked, a mean over no query heads or scores over 0-wide heads are nan for every
        # token, and a nan plan keeps the first tokens.
        q, k, v = random_layers()
        with pytest.raises(ValueError, match=r"q_window\[0\] has no query heads"):
            compress_plan("snapkv", [layer[:0] for layer in q], k, v, 0.5, window=8)
        with pytest.raises(ValueError, match=r"keys\[0\] must be \[Hkv=2, n=40, d >= 1\], got \(2, 40, 0\)"):
            compress_plan("lava", [layer[..., :0] for layer in q], [layer[..., :0] for layer in k], v, 0.5, window=8)
        builder = PlanBuilder(make_policy("lava", window=8), 0.3, seq_len=48, num_layers=1, num_kv_heads=2,
                              observe="reconstruct")
        with pytest.raises(ValueError, match=r"repeat_attention\[0\] must be \[Hq \(a positive multiple"):
            builder.add_layer_repeat(torch.rand(0, 40), torch.rand(2, 48, 16))

    def test_mismatched_shapes_name_the_tensor_and_layer(self):
        q, k, v = random_layers()
        v[1] = v[1][:, :-1]
        with pytest.raises(ValueError, match=r"values\[1\] must be \[Hkv=2, n=40, d >= 1\]"):
            compress_plan("lava", q, k, v, 0.5, window=8)
        q, k, v = random_layers()
        k[2] = k[2][:, :-2]
        with pytest.raises(ValueError, match=r"keys\[2\]"):
            compress_plan("lava", q, k, v, 0.5, window=8)

    def test_window_queries_must_match_the_window(self):
        q, k, v = random_layers(window=8)
        with pytest.raises(ValueError, match=r"q_window\[0\] must be \[Hq, w=4"):
            compress_plan("lava", q, k, v, 0.5, window=4)

    def test_non_finite_tensors(self):
        q, k, v = random_layers()
        k[1][0, 3, 2] = math.nan
        with pytest.raises(ValueError, match=r"keys\[1\] contains non-finite"):
            compress_plan("lava", q, k, v, 0.5, window=8)
        q, k, v = random_layers()
        q[0][0, 0, 0] = math.inf
        with pytest.raises(ValueError, match=r"q_window\[0\] contains non-finite"):
            compress_plan("snapkv", q, k, v, 0.5, window=8)

    def test_budget_out_of_range(self):
        q, k, v = random_layers()
        with pytest.raises(ValueError, match="keep ratio in \\(0, 1\\]"):
            compress_plan("lava", q, k, v, 1.2, window=8)

    @pytest.mark.parametrize("option, value", [("window", 0), ("pool_kernel", 4), ("alpha", 1.5), ("alpha", math.nan)])
    def test_bad_hyper_parameters(self, option, value):
        q, k, v = random_layers()
        options = {"window": 8, option: value}
        with pytest.raises(ValueError, match=option):
            compress_plan("lava", q, k, v, 0.5, **options)

    def test_builder_refuses_extra_or_missing_layers(self):
        q, k, v = random_layers(num_layers=2)
        builder = PlanBuilder(make_policy("lava", window=8), 0.5, seq_len=40, num_layers=1, num_kv_heads=2)
        builder.add_layer(q[0], k[0], v[0])
        with pytest.raises(ValueError, match="more layers than num_layers=1"):
            builder.add_layer(q[1], k[1], v[1])
        short = PlanBuilder(make_policy("lava", window=8), 0.5, seq_len=40, num_layers=2, num_kv_heads=2)
        short.add_layer(q[0], k[0], v[0])
        with pytest.raises(ValueError, match="got 1 layers, expected num_layers=2"):
            short.finish()


SHARDED = ["lava", PAPER_SPEC, "lava:layer_budget=uniform", "kvzip", "snapkv", "ada_snapkv", "pyramidkv",
           "streamingllm"]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("policy_spec", SHARDED)
def test_sharded_heads_keep_exactly_the_single_process_rows(policy_spec, world_size):
    # Tensor parallel: each rank scores only its KV heads; with the scores gathered, every
    # rank's plan is the single-process plan's rows for its heads (entropy layer budgets and
    # global thresholds span heads, so planning a rank's heads alone would differ).
    from lava_sglang.policy import HeadShard

    num_layers, num_kv_heads, group, seq_len, window, dim = 4, 6, 2, 60, 8, 16
    q, k, v = random_layers(num_layers=num_layers, num_q_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
                            seq_len=seq_len, window=window, head_dim=dim, seed=7)
    policy = make_policy(policy_spec, window=window)
    single = compress_plan(policy, q, k, v, 0.25)
    local = num_kv_heads // world_size
    ranks = [(slice(rank * local, (rank + 1) * local), slice(rank * local * group, (rank + 1) * local * group))
             for rank in range(world_size)]
    all_scores = None
    if policy.needs_scores:  # what the all-gather returns: every rank's own scores, in rank order
        all_scores = torch.stack([torch.cat([policy.layer_scores(q[layer][q_heads], k[layer][kv_heads],
                                                                  v[layer][kv_heads]).scores
                                             for kv_heads, q_heads in ranks], dim=0)
                                  for layer in range(num_layers)])
    exchanged = []

    def all_gather(scores):
        exchanged.append(scores.numel() * scores.element_size())
        return all_scores

    kept = []
    for rank, (kv_heads, q_heads) in enumerate(ranks):
        builder = PlanBuilder(policy, 0.25, seq_len=seq_len, num_layers=num_layers, num_kv_heads=local,
                              head_shard=HeadShard(rank, world_size, all_gather))
        for layer in range(num_layers):
            builder.add_layer(q[layer][q_heads], k[layer][kv_heads], v[layer][kv_heads])
        plan = builder.finish()
        assert plan.layer_budgets == single.layer_budgets
        assert plan.head_budgets == [heads[kv_heads] for heads in single.head_budgets]
        kept.append(plan.kept)
    for layer in range(num_layers):
        merged = [positions for rank_kept in kept for positions in rank_kept[layer]]
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(merged, single.kept[layer], strict=True))
    # Scores are exchanged only where the allocation spans heads: L x Hkv x m x 4 bytes per plan.
    if policy.needs_scores:
        assert sum(exchanged) == world_size * num_layers * local * (seq_len - window) * 4
    else:
        assert exchanged == []


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("policy_spec", ["lava", "snapkv", PAPER_SPEC])
def test_sharded_heads_keep_the_single_process_rows_under_branches(policy_spec, world_size):
    # Several windows' votes are each divided by the window's average per-head total over ALL
    # the model's heads: a rank that averaged its own heads would scale its scores by another
    # factor than its neighbours', and the threshold over the gathered scores would move rows.
    from lava_sglang.policy import HeadShard, ObservationWindow

    num_layers, num_kv_heads, group, seq_len, window, dim = 3, 6, 2, 50, 8, 16
    q, k, v = random_layers(num_layers=num_layers, num_q_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
                            seq_len=seq_len, window=window, head_dim=dim, seed=3)
    gen = torch.Generator().manual_seed(4)
    windows = [[ObservationWindow(q[layer])] + [
        ObservationWindow(torch.randn(num_kv_heads * group, 4, dim, generator=gen) * scale,
                          own_keys=torch.randn(num_kv_heads, 6, dim, generator=gen)) for scale in (1.0, 3.0)]
        for layer in range(num_layers)]
    for layer in range(num_layers):  # the first heads' attention stays on the prefix far more than the others'
        k[layer][: num_kv_heads // 2] *= 4.0
    policy = make_policy(policy_spec, window=window)
    single = PlanBuilder(policy, 0.25, seq_len=seq_len, num_layers=num_layers, num_kv_heads=num_kv_heads,
                         observe="branches")
    for layer in range(num_layers):
        single.add_layer_windows(windows[layer], k[layer], v[layer])
    single = single.finish()
    local = num_kv_heads // world_size
    sent = {}  # (call, rank) -> what the rank gave the all-gather

    def plan_ranks():
        """Every rank's plan, its all-gathers answered by what every rank sent in the pass before."""
        plans = []
        for rank in range(world_size):
            kv_heads = slice(rank * local, (rank + 1) * local)
            q_heads = slice(rank * local * group, (rank + 1) * local * group)
            calls = []

            def all_gather(tensor, rank=rank, calls=calls):
                call = len(calls)
                calls.append(tuple(tensor.shape))
                sent[call, rank] = tensor
                shares = [sent.get((call, other), torch.zeros_like(tensor)) for other in range(world_size)]
                return torch.cat(shares, dim=1)

            builder = PlanBuilder(policy, 0.25, seq_len=seq_len, num_layers=num_layers, num_kv_heads=local,
                                  observe="branches", head_shard=HeadShard(rank, world_size, all_gather))
            for layer in range(num_layers):
                rank_windows = [ObservationWindow(w.queries[q_heads], None if w.is_tail else w.own_keys[kv_heads])
                                for w in windows[layer]]
                builder.add_layer_windows(rank_windows, k[layer][kv_heads], v[layer][kv_heads])
            plans.append(builder.finish())
            # Per layer the 3 windows' per-head totals, then the plan's scores.
            assert calls == [(3, local, 1)] * num_layers + [(num_layers, local, seq_len - window)]
        return plans

    # Ranks run one after another here: the first pass sends every rank's window totals, the
    # second every rank's scores made with all the totals, the third receives all of them.
    plan_ranks()
    plan_ranks()
    plans = plan_ranks()
    for rank, plan in enumerate(plans):
        assert plan.head_budgets == [heads[rank * local:(rank + 1) * local] for heads in single.head_budgets]
    for layer in range(num_layers):
        merged = [positions for plan in plans for positions in plan.kept[layer]]
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(merged, single.kept[layer], strict=True))


def test_a_sharded_plan_refuses_what_it_cannot_reproduce():
    from lava_sglang.policy import HeadShard

    with pytest.raises(ValueError, match="sink_tokens > 0 cannot be planned over sharded heads"):
        PlanBuilder(make_policy("lava:layer_budget=entropy,sink_tokens=4"), 0.2, seq_len=40, num_layers=2,
                    num_kv_heads=1, head_shard=HeadShard(0, 2, lambda scores: scores))
    with pytest.raises(ValueError, match="head_shard.rank must be in"):
        PlanBuilder(make_policy("lava"), 0.2, seq_len=40, num_layers=2, num_kv_heads=1,
                    head_shard=HeadShard(2, 2, lambda scores: scores))
    builder = PlanBuilder(make_policy("lava", window=8), 0.2, seq_len=40, num_layers=1, num_kv_heads=1,
                          head_shard=HeadShard(0, 2, lambda scores: scores))  # a gather that forgets the others
    q, k, v = random_layers(num_layers=1, num_q_heads=2, num_kv_heads=1, seq_len=40, window=8)
    builder.add_layer(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="must return every rank's scores \\[1, 2, 32\\]"):
        builder.finish()


def test_plan_builder_takes_a_policy_name_and_refuses_anything_else():
    assert PlanBuilder("lava:window=4", 0.5, seq_len=10, num_layers=1, num_kv_heads=1).policy.window == 4
    with pytest.raises(ValueError, match="policy must be a policy name, a spec or a Policy, got 3"):
        PlanBuilder(3, 0.5, seq_len=10, num_layers=1, num_kv_heads=1)


def test_add_layer_repeat_names_the_shape_it_needs():
    builder = PlanBuilder("lava", 0.5, seq_len=10, num_layers=1, num_kv_heads=1, observe="reconstruct")
    with pytest.raises(ValueError, match=r"must be a 2-D tensor \[Hq, m\], got \(2\,\)"):
        builder.add_layer_repeat(torch.ones(2), torch.ones(1, 10, 4))


def test_a_global_threshold_refuses_head_budgets_it_would_ignore():
    with pytest.raises(ValueError, match="head_budget=uniform needs per-layer budgets"):
        make_policy("lava:head_budget=uniform")
    assert make_policy("lava:layer_budget=uniform,head_budget=uniform").head_budget == "uniform"
