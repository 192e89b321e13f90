"""The reference runtime on SmolLM2: exact with a full budget, positions kept, cache untouched."""

import pytest
import torch
from plan_support import same_plan

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def document(runtime):
    from pydoc_data.topics import topics

    text = topics["if"] + topics["while"] + topics["for"]
    return runtime.tokenizer(text)["input_ids"][:400]


@pytest.fixture(scope="module")
def capture(runtime, document):
    return runtime.prefill(document)


def question_ids(runtime, text):
    return runtime.tokenizer(f"\nQuestion: {text}\nAnswer:")["input_ids"]


def test_prefill_logits_and_capture_shapes(runtime, hf_model, document, capture):
    config = hf_model.config
    assert len(capture.keys) == config.num_hidden_layers
    assert capture.q_window[0].shape == (config.num_attention_heads, 32, config.head_dim)
    assert capture.keys[0].shape == (config.num_key_value_heads, len(document), config.head_dim)
    with torch.inference_mode():
        expected = hf_model(torch.tensor([document])).logits[0, -1]
    torch.testing.assert_close(capture.last_logits, expected, atol=1e-4, rtol=1e-4)


def test_surprisal_is_each_tokens_negative_log_likelihood(runtime, hf_model, document):
    with torch.inference_mode():
        log_probs = torch.log_softmax(hf_model(torch.tensor([document])).logits[0, :-1].float(), dim=-1)
    expected = -log_probs.gather(1, torch.tensor(document[1:])[:, None])[:, 0]
    surprisal = runtime.surprisal(document)
    assert surprisal.shape == (len(document),) and surprisal[0] == 0
    torch.testing.assert_close(surprisal[1:], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["lava", "snapkv", "full"])
def test_full_budget_gives_the_uncompressed_logits(runtime, hf_model, document, capture, policy):
    prefix = runtime.compress(capture, policy, 1.0)
    question = question_ids(runtime, "Which statement repeats while a condition holds?")
    logits, _ = runtime.forward([prefix], torch.tensor([question]))
    with torch.inference_mode():
        expected = hf_model(torch.tensor([document + question])).logits[0, len(document):]
    torch.testing.assert_close(logits[0], expected, atol=1e-4, rtol=1e-4)


def test_compressed_prefix_matches_masked_full_attention(runtime, hf_model, document, capture):
    # StreamingLLM keeps the same positions in every layer and head, so stock attention over
    # the whole sequence with the evicted document keys masked out is an independent oracle:
    # it checks that kept keys keep their positions and new tokens continue at n.
    prefix = runtime.compress(capture, "streamingllm", 0.25)
    kept = prefix.plan.kept[0][0]
    question = question_ids(runtime, "What does the else clause do?")
    logits, _ = runtime.forward([prefix], torch.tensor([question]))
    total = len(document) + len(question)
    mask = torch.ones(total, total, dtype=torch.bool).tril()
    evicted = torch.ones(len(document), dtype=torch.bool)
    evicted[kept] = False
    mask[len(document):, : len(document)] &= ~evicted
    with torch.inference_mode():
        expected = hf_model(torch.tensor([document + question]), attention_mask=mask[None, None]).logits
    torch.testing.assert_close(logits[0], expected[0, len(document):], atol=1e-4, rtol=1e-4)
    assert prefix.plan.keep_ratio == pytest.approx(0.25, abs=0.01)


def test_answering_leaves_the_compressed_cache_unchanged(runtime, capture):
    prefix = runtime.compress(capture, "lava", 0.3)
    keys_before = [k.clone() for k in prefix.keys]
    first = question_ids(runtime, "What does the for statement iterate over?")
    second = question_ids(runtime, "When is the else clause of a loop executed?")
    alone = runtime.generate([prefix], second, max_new_tokens=12)
    runtime.generate([prefix], first, max_new_tokens=12)
    after = runtime.generate([prefix], second, max_new_tokens=12)
    assert after == alone
    assert all(torch.equal(a, b) for a, b in zip(keys_before, prefix.keys))
    logits_alone = runtime.continuation_logits([prefix], second, alone[0] or [0])
    logits_after = runtime.continuation_logits([prefix], second, after[0] or [0])
    assert torch.equal(logits_alone, logits_after)


def test_a_batch_of_prefixes_answers_as_each_alone(runtime, capture):
    prefixes = [runtime.compress(capture, policy, 0.3) for policy in ("lava", "snapkv", "streamingllm")]
    question = question_ids(runtime, "Name a loop statement.")
    batched = runtime.continuation_logits(prefixes, question, [330, 1345, 28])
    for row, prefix in enumerate(prefixes):
        alone = runtime.continuation_logits([prefix], question, [330, 1345, 28])
        torch.testing.assert_close(batched[row], alone[0], atol=1e-4, rtol=1e-4)


def test_teacher_forced_logits_rank_the_greedy_answer_first(runtime, capture):
    # The fidelity benchmark reads a full cache's greedy answer back through
    # continuation_logits: on the same prefix, each step must rank that answer's token first.
    prefix = runtime.full_prefix(capture)
    question = question_ids(runtime, "Which statement repeats while a condition holds?")
    answer = runtime.generate([prefix], question, max_new_tokens=8)[0]
    assert len(answer) >= 2
    logits = runtime.continuation_logits([prefix], question, answer)
    assert logits.argmax(-1)[0].tolist() == answer


def test_query_aware_continuation_starts_from_the_prefill_logits(runtime, hf_model, document):
    question = question_ids(runtime, "Which statement repeats while a condition holds?")
    capture = runtime.prefill(document + question)
    prefix = runtime.compress(capture, "lava", 1.0)
    answer = runtime.generate([prefix], [], max_new_tokens=6)[0]
    with torch.inference_mode():
        expected = hf_model.generate(torch.tensor([document + question]), max_new_tokens=6, do_sample=False)
    expected = [t for t in expected[0, len(document) + len(question):].tolist() if t != runtime.tokenizer.eos_token_id]
    assert answer == expected


def test_kv_bytes_counts_kept_rows(runtime, capture):
    prefix = runtime.compress(capture, "snapkv", 100)
    config = runtime.model.config
    rows = config.num_hidden_layers * config.num_key_value_heads * 100
    assert prefix.kv_bytes(bytes_per_element=2) == rows * 2 * config.head_dim * 2


def test_compress_many_gives_the_plans_of_compress_plan(runtime, capture):
    from lava_sglang.policy import compress_plan
    from lava_sglang.policy.lava import PAPER_SPEC

    configs = [("full", 1.0), ("lava", 0.2), (PAPER_SPEC, 0.2), ("snapkv", 0.2), ("ada_snapkv", 0.4),
               ("pyramidkv", 0.2), ("streamingllm", 0.2), ("snapkv", 0.4)]
    many = runtime.compress_many(capture, configs)
    for (policy, ratio), prefix in zip(configs, many):
        plan = compress_plan(policy, capture.q_window, capture.keys, capture.values, ratio, window=runtime.window)
        assert same_plan(prefix.plan, plan), policy


def test_a_policy_window_reads_the_last_of_the_captured_window_queries(runtime, capture):
    from lava_sglang.policy import compress_plan

    narrow = runtime.compress(capture, "lava:window=8", 0.2)
    last_eight = [queries[:, -8:] for queries in capture.q_window]
    assert same_plan(narrow.plan, compress_plan("lava:window=8", last_eight, capture.keys, capture.values, 0.2))
    with pytest.raises(ValueError, match="window is 64 tokens, but the capture holds 32 window queries"):
        runtime.compress(capture, "lava:window=64", 0.2)


def test_an_observation_compresses_only_the_prefix_it_observed(runtime, document, capture):
    other = runtime.prefill(document[:300])
    observation = runtime.observe(other, "tail")
    with pytest.raises(ValueError, match="another prefix"):
        runtime.compress(capture, "lava", 0.2, observation=observation)
    assert runtime.compress(other, "lava", 0.2, observation=observation).plan.keep_ratio > 0


@pytest.mark.parametrize("window", [0, -4, 2.5, True])
def test_a_window_that_is_not_a_positive_int_is_refused(runtime, window):
    # The prefill keeps each layer's last `window` queries: 0 would keep every one.
    from lava_sglang.reference import ReferenceRuntime

    with pytest.raises(ValueError, match=f"window must be an int >= 1, got {window!r}"):
        ReferenceRuntime(runtime.model, runtime.tokenizer, window=window)
