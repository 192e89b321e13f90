"""Observation sources (docs/observe.md): window combination, branch windows, repetition scores."""

import math

import pytest
import torch

from lava_sglang.kernels.attention_states import flash_attention_with_lse
from lava_sglang.policy import (Branches, ObservationWindow, PlanBuilder, Reconstruct, assistant_turn_text,
                                combine_window_masses, compress_plan, make_observe, make_policy, repeat_attention_chunk,
                                repeat_attention_max, repeat_chunks, repeat_log_sum_exp)
from lava_sglang.policy.lava import PAPER_SPEC
from lava_sglang.policy.scores import pool_scores, prefix_attention_mass, window_attention_mass
from plan_support import same_plan


def test_combination_normalises_each_window_then_takes_the_max_or_mean():
    # Window a: heads total 4 and 4 (mean 4); window b: 2 and 2 (mean 2).
    a = torch.tensor([[1.0, 3.0], [0.0, 4.0]])
    b = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    # a / 4 = [[.25, .75], [0, 1]]; b / 2 = [[1, 0], [1, 0]].
    assert torch.allclose(combine_window_masses([a, b], "max"), torch.tensor([[1.0, 0.75], [1.0, 1.0]]))
    assert torch.allclose(combine_window_masses([a, b], "mean"), torch.tensor([[0.625, 0.375], [0.5, 0.5]]))


def test_normalisation_keeps_the_ratio_between_heads_of_one_window():
    mass = torch.tensor([[1.0, 1.0], [3.0, 3.0]])  # head 1 pays three times head 0's attention
    weaker = torch.tensor([[0.5, 0.0], [0.5, 0.0]])  # another window, on the first token only
    combined = combine_window_masses([mass, weaker], "max")
    # mass / 4 (its mean per-head total) against weaker / 0.5: [[.25, .25], [.75, .75]] and [[1, 0], [1, 0]]
    assert torch.allclose(combined, torch.tensor([[1.0, 0.25], [1.0, 0.75]]))
    assert torch.equal(combine_window_masses([mass], "max"), mass)  # one window: nothing to balance
    # Totals given (tensor parallel: over every head of the model) must be one row per window.
    assert torch.allclose(combine_window_masses([mass, weaker], "max", torch.tensor([[8.0], [0.5]])),
                          torch.tensor([[1.0, 0.125], [1.0, 0.375]]))
    with pytest.raises(ValueError, match=r"head_totals must be \[W = 3 windows, Hkv\], got \[2, 2\]"):
        combine_window_masses([mass, weaker, 100 * weaker], "max", torch.ones(2, 2))


def test_branch_window_sees_the_whole_prefix_and_its_own_tokens_causally():
    # Zero queries spread attention evenly over what they see: query 0 sees 4 prefix keys and
    # 1 own key (1/5 each), query 1 sees 4 + 2 (1/6 each); the mean is (1/5 + 1/6) / 2 = 11/60.
    queries = torch.zeros(2, 2, 4)  # Hq = 2, r = 2
    prefix_keys = torch.randn(1, 4, 4)
    own_keys = torch.randn(1, 2, 4)
    mass = prefix_attention_mass(queries, prefix_keys, own_keys, 3, "max")
    assert mass.shape == (1, 3)
    assert torch.allclose(mass, torch.full((1, 3), 11 / 60))


def test_a_branch_window_scores_the_prefix_as_query_aware_scoring_does():
    # Query-aware: the question (s tokens, all of them the window) is appended to the document
    # and scored as the tail of document + question. Its mass on the document's selectable
    # tokens is the branch window's mass, exactly.
    gen = torch.Generator().manual_seed(1)
    doc_len, question_len, tail = 30, 6, 4
    doc_keys = torch.randn(2, doc_len, 8, generator=gen)
    question_keys = torch.randn(2, question_len, 8, generator=gen)
    queries = torch.randn(6, question_len, 8, generator=gen)
    query_aware = window_attention_mass(queries, torch.cat([doc_keys, question_keys], dim=1), "max")
    branch = ObservationWindow(queries, own_keys=question_keys).mass(doc_keys, doc_len - tail, "max")
    torch.testing.assert_close(branch, query_aware[:, : doc_len - tail])


def random_prefix(num_layers=2, num_q_heads=4, num_kv_heads=2, seq_len=40, window=8, head_dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = [torch.randn(num_q_heads, window, head_dim, generator=gen) for _ in range(num_layers)]
    k = [torch.randn(num_kv_heads, seq_len, head_dim, generator=gen) for _ in range(num_layers)]
    v = [torch.randn(num_kv_heads, seq_len, head_dim, generator=gen) for _ in range(num_layers)]
    branches = [[ObservationWindow(torch.randn(num_q_heads, 5, head_dim, generator=gen),
                                   own_keys=torch.randn(num_kv_heads, 7, head_dim, generator=gen))
                 for _ in range(2)] for _ in range(num_layers)]
    return q, k, v, branches


def build(policy, observe, layers, budget=16, window=8):
    builder = PlanBuilder(make_policy(policy, window=window), budget, seq_len=layers[1][0].shape[1],
                          num_layers=len(layers[0]), num_kv_heads=layers[1][0].shape[0], observe=observe)
    for windows, keys, values in zip(*layers):
        builder.add_layer_windows(windows, keys, values)
    return builder.finish()


# A single window is not normalised: a per-layer scalar would move a global threshold across
# layers (kvzip's and lava's default allocation).
@pytest.mark.parametrize("policy", ["lava", "kvzip", PAPER_SPEC, "snapkv", "ada_snapkv", "streamingllm"])
def test_the_tail_window_alone_gives_the_tail_plan_under_either_source(policy):
    q, k, v, _ = random_prefix()
    tail_plan = compress_plan(policy, q, k, v, 16, window=8)
    windows = [[ObservationWindow(layer_q)] for layer_q in q]
    assert same_plan(build(policy, "tail", (windows, k, v)), tail_plan)
    assert same_plan(build(policy, Branches(), (windows, k, v)), tail_plan)


def test_branches_plan_is_lava_on_the_combined_mass():
    q, k, v, branches = random_prefix()
    windows = [[ObservationWindow(layer_q)] + layer_branches for layer_q, layer_branches in zip(q, branches)]
    plan = build(PAPER_SPEC, Branches(combine="max"), (windows, k, v))
    policy = make_policy(PAPER_SPEC, window=8)
    expected = PlanBuilder(policy, 16, seq_len=40, num_layers=2, num_kv_heads=2)
    for layer_windows, keys, values in zip(windows, k, v):
        mass = combine_window_masses([w.mass(keys, 32, "max") for w in layer_windows], "max")
        scores = pool_scores(mass, 7) * values[:, :32].abs().sum(-1).amax(-1)[:, None]
        expected.add_layer_scores(policy.scores_from_mass(mass, values))
        torch.testing.assert_close(policy.scores_from_mass(mass, values).scores, scores)
    assert same_plan(plan, expected.finish())
    assert not same_plan(plan, compress_plan(PAPER_SPEC, q, k, v, 16, window=8))


def test_branches_without_the_tail_scores_by_the_branches_alone():
    q, k, v, branches = random_prefix()
    with_tail = [[ObservationWindow(layer_q)] + layer_branches for layer_q, layer_branches in zip(q, branches)]
    assert same_plan(build("snapkv", Branches(include_tail=False), (with_tail, k, v)),
                     build("snapkv", Branches(), (branches, k, v)))


def test_repeat_scores_reduce_the_group_and_scale_by_the_value_norm():
    # One KV head, two query heads; the repetition's max attention per query head.
    repeat = torch.tensor([[0.1, 0.5, 0.2, 0.0], [0.3, 0.1, 0.1, 0.0]])
    values = torch.ones(1, 6, 2)
    values[0, 0] = 3.0  # L1 norm 6 at token 0: vbar = 6
    paper = PAPER_SPEC + ",pool_kernel=1"
    for policy, expected in ((paper, [[0.3, 0.5, 0.2, 0.0]]), ("snapkv", [[0.2, 0.3, 0.15, 0.0]])):
        builder = PlanBuilder(make_policy(policy, window=2, pool_kernel=1), 3, seq_len=6, num_layers=1,
                              num_kv_heads=1, observe="reconstruct")
        builder.add_layer_repeat(repeat, values)
        plan = builder.finish()
        scale = 6.0 if policy == paper else 1.0
        best = int(torch.tensor(expected).argmax())
        assert plan.kept[0][0].tolist() == [best, 4, 5]
        assert plan.layer_entropy[0] == pytest.approx(
            float(-(p := torch.tensor(expected[0]) * scale / (torch.tensor(expected[0]) * scale).sum())[p > 0]
                  .mul(p[p > 0].log()).sum() / math.log(4)), rel=1e-5)


def test_repeat_scores_scaled_by_the_value_norm_move_rows_to_the_head_with_larger_values():
    # Two KV heads, one query head each: head 1's values are 3x head 0's. Unscaled, head 0's
    # 0.4 wins a row over head 1's 0.25; scaled by vbar (x1 against x3), 0.75 beats 0.4.
    repeat = torch.tensor([[0.4, 0.0, 0.0, 0.0], [0.0, 0.3, 0.25, 0.0]])
    values = torch.ones(2, 6, 2)
    values[1] *= 3.0
    kept = {}
    for value_norm in ("true", "false"):
        policy = make_policy(f"lava:layer_budget=entropy,value_norm={value_norm}", window=2, pool_kernel=1)
        builder = PlanBuilder(policy, 3, seq_len=6, num_layers=1, num_kv_heads=2, observe="reconstruct")
        builder.add_layer_repeat(repeat, values)
        kept[value_norm] = [head.tolist() for head in builder.finish().kept[0]]
    assert kept == {"true": [[4, 5], [1, 2, 4, 5]], "false": [[0, 4, 5], [1, 4, 5]]}


def test_repeat_attention_max_is_the_max_over_queries():
    probs = torch.tensor([[[0.1, 0.9], [0.7, 0.3]]])  # [Hq=1, T=2, m=2]
    assert repeat_attention_max(probs.log()).tolist() == [[pytest.approx(0.7), pytest.approx(0.9)]]


def test_repeat_attention_chunk_is_the_causal_softmax_over_all_keys_in_any_block_size():
    # Oracle: the full causal attention of n + T tokens (GQA, Hq = 4 over Hkv = 2), the last T
    # rows being the chunk; per query head the max over those rows on the copied keys.
    torch.manual_seed(0)
    num_q_heads, num_kv_heads, n, rows, d = 4, 2, 12, 5, 8
    keys = torch.randn(num_kv_heads, n + rows, d)
    queries = torch.randn(num_q_heads, rows, d)
    scaling = d ** -0.5
    logits = torch.einsum("gtd,gsd->gts", queries, keys.repeat_interleave(2, dim=0)) * scaling
    causal = torch.arange(n + rows)[None, :] > (n + torch.arange(rows))[:, None]
    probs = torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1)
    for copied in ((0, 9), (3, 7)):
        expected = probs[:, :, copied[0]:copied[1]].amax(dim=1)
        for max_logits in (1 << 24, num_q_heads * (n + rows)):  # one block; one query row per block
            result = repeat_attention_chunk(queries, keys, n, n, copied, scaling, max_logits=max_logits)
            torch.testing.assert_close(result, expected)
    # The normaliser may come from the model's own attention (its LSE over every key it saw).
    lse = torch.logsumexp(logits.masked_fill(causal, float("-inf")), dim=-1)
    torch.testing.assert_close(repeat_attention_chunk(queries, keys, n, n, (3, 7), scaling, lse=lse),
                               probs[:, :, 3:7].amax(dim=1))
    with pytest.raises(ValueError, match="global normaliser"):
        repeat_attention_chunk(queries, keys, n, n, (3, 7), scaling, normalize="local", lse=lse)
    with pytest.raises(ValueError, match="prefix_len"):
        repeat_attention_chunk(queries, keys, n, n, (0, n + 1), scaling)
    with pytest.raises(ValueError, match="do not match"):
        repeat_attention_chunk(queries[:3], keys, n, n, (0, 9), scaling)
    with pytest.raises(ValueError, match="normalize must be one of"):
        repeat_attention_chunk(queries, keys, n, n, (0, 9), scaling, normalize="none")
    with pytest.raises(ValueError, match="at least one repetition query"):  # the flash kernel would kill the process
        repeat_attention_chunk(queries[:, :0], keys, n, n, (0, 9), scaling)


def test_repeat_log_sum_exp_is_the_same_from_the_cpu_flash_kernel_and_from_the_logits():
    torch.manual_seed(2)
    num_kv_heads, group, rows, num_keys, d = 2, 3, 7, 20, 8
    queries = torch.randn(num_kv_heads, group, rows, d)
    keys = torch.randn(num_kv_heads, num_keys, d)
    visible = torch.arange(num_keys)[None, :] <= (10 + torch.arange(rows))[:, None]
    logits = torch.einsum("hgtd,hsd->hgts", queries, keys) * 0.3
    expected = torch.logsumexp(logits.masked_fill(~visible, float("-inf")), dim=-1)
    assert flash_attention_with_lse(queries, keys, keys, visible, 0.3) is not None  # the flash path is taken
    flash = repeat_log_sum_exp(queries, keys, visible, 0.3)  # fp32 on the CPU: PyTorch's flash kernel
    blocked = repeat_log_sum_exp(queries.double(), keys.double(), visible, 0.3, max_logits=num_kv_heads * group * 20)
    torch.testing.assert_close(flash, expected)
    torch.testing.assert_close(blocked.float(), expected)
    for no_queries, no_keys in ((queries[:, :, :0], keys), (queries, keys[:, :0])):
        with pytest.raises(ValueError, match="at least one query and one key"):
            repeat_log_sum_exp(no_queries, no_keys, visible[:no_queries.shape[2], :no_keys.shape[1]], 0.3)


def test_local_normalisation_is_the_softmax_over_sinks_copied_tokens_and_the_repetition():
    # KVzip's local score: the softmax runs over the sink tokens, the tokens the chunk copies
    # and the repetition's own tokens only; the rest of the prefix takes no part.
    torch.manual_seed(1)
    num_q_heads, num_kv_heads, n, rows, d, sinks = 4, 2, 12, 5, 8, 2
    keys = torch.randn(num_kv_heads, n + rows, d)
    queries = torch.randn(num_q_heads, rows, d)
    scaling = d ** -0.5
    copied = (6, 10)
    local = [0, 1, 6, 7, 8, 9] + list(range(n, n + rows))
    logits = torch.einsum("gtd,gsd->gts", queries, keys[:, local].repeat_interleave(2, dim=0)) * scaling
    causal = torch.tensor(local)[None, :] > (n + torch.arange(rows))[:, None]
    expected = torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1)[:, :, 2:6].amax(dim=1)
    result = repeat_attention_chunk(queries, keys, n, n, copied, scaling, normalize="local", sink_tokens=sinks)
    torch.testing.assert_close(result, expected)
    everything = repeat_attention_chunk(queries, keys, n, n, copied, scaling)
    assert (result >= everything - 1e-6).all() and (result > everything + 1e-3).any()


def test_repeat_chunks_cover_the_prefix_in_order():
    assert repeat_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert repeat_chunks(10, 2048) == [(0, 10)]


def test_later_chunks_are_introduced_by_the_previous_chunks_last_tokens():
    source = Reconstruct(instruction="I", continue_instruction="C", overlap_tokens=2, chat_turn=False)
    encode = {"I": [100], "C": [200]}.__getitem__
    tokens = list(range(10))
    assert source.chunk_prompt(tokens, 0, encode) == [100]
    assert source.chunk_prompt(tokens, 4, encode) == [200, 2, 3]


def test_a_chat_turn_puts_the_assistant_opening_after_each_chunks_instruction():
    source = Reconstruct(instruction="I", continue_instruction="C", overlap_tokens=2, chat_turn=True)
    encode = {"I": [100], "C": [200], "<end><assistant>": [7, 8]}.__getitem__
    tokens = list(range(10))
    assert source.chunk_prompt(tokens, 0, encode, "<end><assistant>") == [100, 7, 8]
    assert source.chunk_prompt(tokens, 4, encode, "<end><assistant>") == [200, 2, 3, 7, 8]
    with pytest.raises(ValueError, match="chat_turn=true needs the tokenizer's chat template"):
        source.chunk_prompt(tokens, 0, encode)


def test_assistant_turn_text_is_what_the_template_puts_between_a_user_message_and_the_reply():
    def chatml(messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return "<|im_start|>system\nbe brief<|im_end|>\n" + text + "<|im_start|>assistant\n"

    assert assistant_turn_text(chatml) == "<|im_end|>\n<|im_start|>assistant\n"

    def no_template(*args, **kwargs):
        raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set")

    with pytest.raises(ValueError, match="no usable chat template"):
        assistant_turn_text(no_template)
    with pytest.raises(ValueError, match="does not render the user message"):
        assistant_turn_text(lambda *args, **kwargs: "the message dropped")


class TestBadInput:
    def test_unknown_source_and_bad_options(self):
        with pytest.raises(ValueError, match=r"observe must be one of \['branches', 'reconstruct', 'tail'\]"):
            make_observe("bogus")
        with pytest.raises(ValueError, match="combine must be one of"):
            make_observe("branches", combine="sum")
        with pytest.raises(ValueError, match="chunk_tokens must be an int >= 1"):
            make_observe("reconstruct", chunk_tokens=0)
        with pytest.raises(ValueError, match="normalize must be one of"):
            make_observe("reconstruct", normalize="softmax")
        with pytest.raises(ValueError, match="overlap_tokens must be an int >= 0"):
            make_observe("reconstruct", overlap_tokens=-1)
        with pytest.raises(ValueError, match="include_tail must be a bool"):
            Branches(include_tail=1).validate()
        with pytest.raises(ValueError, match="chat_turn must be a bool, got 'yes'"):
            make_observe("reconstruct", chat_turn="yes")

    def test_methods_must_match_the_source(self):
        q, k, v, branches = random_prefix(num_layers=1)
        tail = PlanBuilder(make_policy("lava", window=8), 16, seq_len=40, num_layers=1, num_kv_heads=2)
        with pytest.raises(ValueError, match="observe 'tail' takes exactly the tail window"):
            tail.add_layer_windows([ObservationWindow(q[0])] + branches[0], k[0], v[0])
        with pytest.raises(ValueError, match="add_layer_repeat needs observe 'reconstruct'"):
            tail.add_layer_repeat(torch.zeros(4, 32), v[0])
        repeat = PlanBuilder(make_policy("lava", window=8), 16, seq_len=40, num_layers=1, num_kv_heads=2,
                             observe=Reconstruct())
        with pytest.raises(ValueError, match="use add_layer_repeat"):
            repeat.add_layer(q[0], k[0], v[0])
        with pytest.raises(ValueError, match=r"repeat_attention\[0\] must be \[Hq"):
            repeat.add_layer_repeat(torch.zeros(4, 31), v[0])
        with pytest.raises(ValueError, match="observe must be one of"):
            PlanBuilder(make_policy("lava"), 16, seq_len=40, num_layers=1, num_kv_heads=2, observe="query")

    def test_window_shapes(self):
        q, k, v, branches = random_prefix(num_layers=1)
        builder = PlanBuilder(make_policy("lava", window=8), 16, seq_len=40, num_layers=1, num_kv_heads=2,
                              observe=Branches())
        with pytest.raises(ValueError, match="at most one"):
            builder.add_layer_windows([ObservationWindow(q[0]), ObservationWindow(q[0])], k[0], v[0])
        short = ObservationWindow(branches[0][0].queries, own_keys=branches[0][0].own_keys[:, :3])
        with pytest.raises(ValueError, match=r"own_keys\[0\] must be \[Hkv=2, s >= r=5"):
            builder.add_layer_windows([ObservationWindow(q[0]), short], k[0], v[0])
        with pytest.raises(ValueError, match="non-empty sequence of ObservationWindow"):
            builder.add_layer_windows([], k[0], v[0])
