"""Observation sources on the reference runtime (SmolLM2), against stock transformers."""

import dataclasses

import pytest
import torch

from lava_sglang.policy import Reconstruct, assistant_turn_text, repeat_view_positions

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def document(runtime):
    from pydoc_data.topics import topics

    return runtime.tokenizer(topics["while"])["input_ids"][:96]


@pytest.fixture(scope="module")
def capture(runtime, document):
    return runtime.prefill(document)


def question_ids(runtime, text):
    return runtime.tokenizer(f"\nQuestion: {text}\nAnswer:")["input_ids"]


def test_branch_windows_are_the_question_prefilled_after_the_whole_document(runtime, document, capture):
    question = question_ids(runtime, "When does the loop stop?")
    observation = runtime.observe(capture, "branches", branches=[question])
    joint = runtime.prefill(document + question)  # its window: the last 32 of document + question
    rows = min(runtime.window, len(question))
    for layer, windows in enumerate(observation.branch_windows):
        (window,) = windows
        assert window.queries.shape[1] == rows
        torch.testing.assert_close(window.queries, joint.q_window[layer][:, -rows:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(window.own_keys, joint.keys[layer][:, len(document):], atol=1e-4, rtol=1e-4)


def test_a_policys_window_reads_as_many_queries_of_each_branch_as_of_the_tail(runtime, document, capture,
                                                                             monkeypatch):
    # observe.md defines the tail's and the branches' windows by one w: a runtime that captured
    # 32 queries plans lava:window=8 from the last 8 of each, as a runtime of window 8 does.
    question = question_ids(runtime, "When does the loop stop? Say it in a few words, please.")
    assert len(question) > 8
    wide = runtime.compress(capture, "lava", 0.25, runtime.observe(capture, "branches", branches=[question]),
                            window=8)
    with monkeypatch.context() as patch:
        patch.setattr(runtime, "window", 8)
        narrow_capture = runtime.prefill(document)
        narrow = runtime.compress(narrow_capture, "lava", 0.25,
                                  runtime.observe(narrow_capture, "branches", branches=[question]), window=8)
    for wide_heads, narrow_heads in zip(wide.plan.kept, narrow.plan.kept, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(wide_heads, narrow_heads, strict=True))


def eager_attentions(smollm2_path, token_ids, attention_mask=None):
    """Every layer's attention probabilities; attention_mask: None (causal) or additive [1, 1, T, T]."""
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, attn_implementation="eager")
    with torch.inference_mode():
        return eager(torch.tensor([token_ids]), attention_mask=attention_mask, output_attentions=True).attentions


def test_one_chunk_repetition_matches_eager_attention_over_the_whole_sequence(runtime, smollm2_path, document,
                                                                              capture):
    # Oracle: one eager forward of document + instruction (and the chat template's opening of
    # the assistant's reply) + document with output_attentions; per query head, the max over
    # repetition queries of the attention on each selectable document token.
    source = Reconstruct()
    observation = runtime.observe(capture, source)
    instruction = source.chunk_prompt(document, 0, lambda text: runtime.tokenizer(
        text, add_special_tokens=False)["input_ids"], assistant_turn_text(runtime.tokenizer.apply_chat_template))
    assert runtime.tokenizer.decode(instruction).endswith("exactly.\n<|im_end|>\n<|im_start|>assistant\n")
    attentions = eager_attentions(smollm2_path, document + instruction + document)
    for layer, repeat in enumerate(observation.repeat_attention):
        expected = attentions[layer][0, :, len(document):, :len(document)].amax(dim=1)
        torch.testing.assert_close(repeat, expected, atol=1e-5, rtol=1e-4)
    assert observation.seconds > 0


def repetition_inputs(runtime, document, source):
    """Per chunk of `source`'s repetition: (start, end, the document + the chunk's prompt + the chunk)."""
    def encode(text):
        return runtime.tokenizer(text, add_special_tokens=False)["input_ids"]

    turn = assistant_turn_text(runtime.tokenizer.apply_chat_template)
    for start in range(0, len(document), source.chunk_tokens):
        end = min(start + source.chunk_tokens, len(document))
        yield start, end, document + source.chunk_prompt(document, start, encode, turn) + document[start:end]


@pytest.mark.parametrize("normalize", ["global", "local"])
def test_each_chunk_repeats_after_the_document_alone_and_scores_only_what_it_copies(runtime, smollm2_path, document,
                                                                                    capture, normalize):
    # Oracle per chunk: an eager forward of document + the chunk's prompt + the chunk, with no
    # earlier repeated chunk in between (KVzip drops each chunk's KV); the chunk's queries
    # score the tokens it copies. "local" renormalises the same logits over the sinks, the
    # copied tokens and the repetition (softmax restricted = probabilities divided by their sum).
    source = Reconstruct(chunk_tokens=24, overlap_tokens=4, normalize=normalize, sink_tokens=2)
    observation = runtime.observe(capture, source)
    n = len(document)
    for start, end, tokens in repetition_inputs(runtime, document, source):
        attentions = eager_attentions(smollm2_path, tokens)
        positions = torch.arange(len(tokens))
        keep = (positions < 2) | ((positions >= start) & (positions < end)) | (positions >= n)
        for layer in (0, 11, 29):
            probs = attentions[layer][0, :, n:]
            if normalize == "local":
                probs = probs * keep
                probs = probs / probs.sum(-1, keepdim=True)
            expected = probs[:, :, start:end].amax(dim=1)
            torch.testing.assert_close(observation.repeat_attention[layer][:, start:end], expected,
                                       atol=1e-5, rtol=1e-4)


def test_under_view_chunk_each_chunk_attends_only_to_the_sinks_and_what_it_copies(runtime, smollm2_path, document,
                                                                                   capture):
    # Oracle per chunk: an eager forward of document + the chunk's prompt + the chunk whose
    # mask hides from the repetition every document token but the 2 sinks and the chunk's.
    source = Reconstruct(chunk_tokens=24, overlap_tokens=4, view="chunk", sink_tokens=2)
    observation = runtime.observe(capture, source)
    whole_prefix = runtime.observe(capture, dataclasses.replace(source, view="prefix"))
    n = len(document)
    for start, end, tokens in repetition_inputs(runtime, document, source):
        visible = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
        visible[n:, :n] = False
        visible[n:, repeat_view_positions((start, end), 2)] = True
        mask = torch.zeros(1, 1, *visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
        attentions = eager_attentions(smollm2_path, tokens, mask)
        for layer in (0, 11, 29):
            expected = attentions[layer][0, :, n:, start:end].amax(dim=1)
            torch.testing.assert_close(observation.repeat_attention[layer][:, start:end], expected,
                                       atol=1e-5, rtol=1e-4)
            if start > 2:  # the chunk saw less than the whole prefix, and its scores show it
                assert not torch.allclose(whole_prefix.repeat_attention[layer][:, start:end], expected, atol=1e-3)


def test_each_source_compresses_to_the_budget_and_keeps_its_window(runtime, document, capture):
    question = question_ids(runtime, "When does the loop stop?")
    plans = {}
    for source in ("tail", "branches", "reconstruct"):
        observation = runtime.observe(capture, source, branches=[question])
        prefix = runtime.compress(capture, "lava", 0.5, observation=observation)
        assert prefix.plan.keep_ratio == pytest.approx(0.5, abs=0.02)
        plans[source] = [[positions.tolist() for positions in layer] for layer in prefix.plan.kept]
        # The window kept: the runtime's observation window, or under a repetition its own (8).
        window = Reconstruct.kept_window if source == "reconstruct" else runtime.window
        tail = list(range(capture.seq_len - window, capture.seq_len))
        assert all(positions[-window:] == tail for layer in plans[source] for positions in layer)
        assert any(positions[-window - 1] != tail[0] - 1 for layer in plans[source] for positions in layer)
    assert plans["branches"] != plans["tail"] and plans["reconstruct"] != plans["tail"]


def test_options_given_beside_a_built_source_are_refused(runtime, capture):
    # They would be dropped: the built source's own fields hold.
    with pytest.raises(ValueError, match="options chunk_tokens go with a source's name; reconstruct is built"):
        runtime.observe(capture, Reconstruct(), chunk_tokens=128)


def test_sources_observations_and_policies_that_cannot_be_used_are_refused_by_name(runtime, capture):
    from lava_sglang.policy import make_policy
    from lava_sglang.reference.runtime import Observation

    for source, message in ((make_policy("lava"), "source must be an observation source's name or an Observe"),
                            (None, "source must be an observation source's name or an Observe")):
        with pytest.raises(ValueError, match=message):
            runtime.observe(capture, source)
    for branches in ([5, 6, 7], [[5, 6], []], [["a"]]):  # a flat list, an empty branch, no token ids
        with pytest.raises(ValueError, match="each a non-empty sequence of token ids"):
            runtime.observe(capture, "branches", branches=branches)
    for observation, message in (("reconstruct", "observation must be an Observation"),
                                 (Observation(Reconstruct()), "by reconstruct needs its repeat_attention"),
                                 (Observation(make_policy("lava")), "observation must be an Observation")):
        with pytest.raises(ValueError, match=message):
            runtime.compress(capture, "lava", 0.5, observation)
    # Options beside a built policy would be dropped: its own fields hold.
    with pytest.raises(ValueError, match="options window go with a policy's name; a built policy has its own"):
        runtime.compress(capture, make_policy("lava"), 0.5, window=8)
    assert runtime.compress(capture, make_policy("lava", window=8), 0.5).plan.keep_ratio > 0
