"""Observation sources on the reference runtime (SmolLM2), against stock transformers."""

import pytest
import torch

from lava_sglang.policy import Reconstruct

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


def test_repetition_attention_matches_eager_attention_over_the_whole_sequence(runtime, smollm2_path, document,
                                                                              capture):
    # Oracle: one eager forward of document + instruction + document with output_attentions;
    # per query head, the max over repetition queries of the attention on each selectable
    # document token. The runtime gets it in chunks of 16 against the uncompressed prefix.
    from transformers import AutoModelForCausalLM

    source = Reconstruct(chunk_tokens=16)
    observation = runtime.observe(capture, source)
    instruction = runtime.tokenizer(source.instruction, add_special_tokens=False)["input_ids"]
    eager = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, attn_implementation="eager")
    with torch.inference_mode():
        attentions = eager(torch.tensor([document + instruction + document]), output_attentions=True).attentions
    selectable = len(document) - runtime.window
    for layer, repeat in enumerate(observation.repeat_attention):
        expected = attentions[layer][0, :, len(document):, :selectable].amax(dim=1)
        torch.testing.assert_close(repeat, expected, atol=1e-5, rtol=1e-4)
    assert observation.seconds > 0


def test_each_source_compresses_to_the_budget_and_answers(runtime, document, capture):
    question = question_ids(runtime, "When does the loop stop?")
    plans = {}
    for source in ("tail", "branches", "reconstruct"):
        observation = runtime.observe(capture, source, branches=[question])
        prefix = runtime.compress(capture, "lava", 0.5, observation=observation)
        assert prefix.plan.keep_ratio == pytest.approx(0.5, abs=0.02)
        assert runtime.generate([prefix], question, max_new_tokens=3)[0]
        plans[source] = [[positions.tolist() for positions in layer] for layer in prefix.plan.kept]
    assert plans["branches"] != plans["tail"] and plans["reconstruct"] != plans["tail"]
