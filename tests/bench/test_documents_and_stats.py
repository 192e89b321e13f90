"""Benchmark inputs and statistics: planted facts, determinism, intervals, config checks."""

import math

import pytest

from lava_sglang.bench.documents import (FACT_TEMPLATE, code_finished, fidelity_documents, names_code, prompt_parts,
                                         retrieval_documents)
from lava_sglang.bench.quality import ConfigFieldError, QualityConfig, retrieval_fact_counts
from lava_sglang.bench.stats import mean_interval, share_interval, wilson_interval


def count_words(text: str) -> int:
    return len(text.split())


def test_retrieval_documents_plant_every_fact_once_with_distinct_words():
    documents = retrieval_documents(count_words, 1500, [1, 4, 8], seed=3)
    assert [len(d.questions) for d in documents] == [1, 4, 8]
    for document in documents:
        keys = [q.text.split("special code for ")[1].split("?")[0] for q in document.questions]
        words = [word for key in keys for word in key.split()]
        assert len(words) == len(set(words))
        for key, question in zip(keys, document.questions):
            assert document.text.count(FACT_TEMPLATE.format(key=key, code=question.answer)) == 1
            assert len(question.answer) == 7 and question.answer.isdigit()
        assert 1400 <= count_words(document.text) <= 1800
        # Facts never sit in the last paragraph (the observation window of compress-once).
        assert "special code" not in document.text.split("\n\n")[-1]


def test_documents_are_reproducible_from_the_seed():
    first = retrieval_documents(count_words, 800, [4], seed=11)[0]
    again = retrieval_documents(count_words, 800, [4], seed=11)[0]
    other = retrieval_documents(count_words, 800, [4], seed=12)[0]
    assert first.text == again.text and [q.answer for q in first.questions] == [q.answer for q in again.questions]
    assert first.text != other.text


def test_too_many_facts_is_refused():
    with pytest.raises(ValueError, match="at most 20 facts"):
        retrieval_documents(count_words, 800, [21], seed=0)
    for tokens, facts in ((1, 1), (300, 20)):  # fewer paragraph boundaries than facts
        with pytest.raises(ValueError, match=f"room for .* planted facts, not {facts}: give more tokens"):
            retrieval_documents(count_words, tokens, [facts], seed=0)


def test_fidelity_documents_have_open_questions():
    documents = fidelity_documents(count_words, 600, num_documents=3, questions_per_document=4, seed=1)
    assert len(documents) == 3
    assert all(len(d.questions) == 4 and all(q.answer is None for q in d.questions) for d in documents)


def test_prompt_prefix_is_shared_by_every_question():
    prefix_a, suffix_a = prompt_parts("DOC", "first?")
    prefix_b, suffix_b = prompt_parts("DOC", "second?")
    assert prefix_a == prefix_b and "DOC" in prefix_a and "first?" not in prefix_a
    assert suffix_a.endswith("<|im_start|>assistant\n") and "first?" in suffix_a


@pytest.mark.parametrize("questions, expected", [(40, [1, 4, 8, 1, 4, 8, 1, 4, 8, 1]), (16, [1, 4, 8, 1, 2]),
                                                 (1, [1])])
def test_fact_counts_cycle_and_trim(questions, expected):
    assert retrieval_fact_counts(questions, [1, 4, 8]) == expected  # one question per fact: they sum to questions


@pytest.mark.parametrize(("answer", "finished", "right"), [
    ("The code is 1234567.", True, True),
    ("The code is 1234567", False, True),  # a next digit would make it another number
    ("The code is 12345678.", False, False),  # a longer number neither names the code nor stops
    ("The code is 7654321.", True, False),
    ("The code is 123456.", False, False),
])
def test_a_retrieval_answer_stops_once_a_code_is_finished_and_is_graded_by_the_whole_number(answer, finished,
                                                                                            right):
    characters = list(answer)  # "tokens" of one character each, decoded by joining them
    assert code_finished("".join)(characters) is finished
    assert names_code(answer, "1234567") is right


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 40)[0] == 0.0 and wilson_interval(0, 40)[1] == pytest.approx(0.0876, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mean_interval():
    low, high = mean_interval([1.0, 2.0, 3.0])
    assert (low + high) / 2 == pytest.approx(2.0)
    assert high - low == pytest.approx(2 * 4.302652729911275 / math.sqrt(3))  # Student's t at 2 degrees of freedom
    assert mean_interval([0.0, 0.01, 0.0], low=0.0)[0] == 0.0  # a KL interval does not go below 0
    assert mean_interval([1.0, 0.9, 1.0], low=0.0, high=1.0)[1] == 1.0
    assert mean_interval([0.5], low=0.0, high=1.0) == (0.0, 1.0)  # one question: nothing known of the spread


def test_a_mean_interval_over_documents_takes_the_spread_between_them():
    import math

    # Three documents of two questions each, alike within a document: three samples, not six.
    values, documents = [0.1, 0.1, 0.5, 0.5, 0.9, 0.9], [0, 0, 1, 1, 2, 2]
    assert mean_interval(values, documents) == pytest.approx(mean_interval([0.1, 0.5, 0.9]))
    over_questions = mean_interval(values)
    over_documents = mean_interval(values, documents)
    assert over_documents[1] - over_documents[0] > 2 * (over_questions[1] - over_questions[0])
    # Documents of unequal sizes: centred on the mean over questions (2.2 / 7), not on the mean of
    # the documents' means (1 / 3).
    low, high = mean_interval([0.1, 0.1, 0.1, 0.7, 0.4, 0.5, 0.3], [0, 0, 0, 0, 1, 1, 2])
    assert math.isclose((low + high) / 2, 2.2 / 7)
    assert mean_interval([0.2, 0.4, 0.3], [5, 5, 5], low=0.0, high=1.0) == (0.0, 1.0)  # one document
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])


def test_the_share_of_the_full_caches_answers_is_resampled_by_document_and_paired():
    # Every document loses half its answers: every resample gives 0.5, where two independent
    # proportions of 10 of 20 and 20 of 40 would leave a wide interval.
    assert share_interval([(2, 4)] * 5 + [(1, 2)] * 5) == (0.5, 0.5)
    # The same share, lost whole in half the documents: documents rise and fall together, so
    # the interval is wide.
    low, high = share_interval([(4, 4)] * 5 + [(0, 4)] * 5)
    assert low < 0.25 and high > 0.75
    assert share_interval([(3, 4)] * 10) == (0.75, 0.75)
    assert share_interval([(4, 4)] * 5 + [(0, 4)] * 5) == (low, high)  # seeded: the report is reproducible
    assert share_interval([(3, 4)]) == (0.0, math.inf)  # one document: nothing to resample
    assert share_interval([(0, 0), (0, 0)]) == (0.0, math.inf)  # no right answer to compare with
    # Most resamples miss the one document the full cache answered: the upper end is unbounded, not nan.
    assert share_interval([(1, 1)] + [(0, 0)] * 9) == (1.0, math.inf)


@pytest.mark.parametrize("changes, message", [
    ({"questions": [40]}, "one question count per context"),
    ({"policies": ["lava", "h2o"]}, "policy must be one of"),
    ({"policies": ["full"]}, "always run as the reference"),
    ({"modes": ["sometimes"]}, "modes: unknown"),
    ({"keep_ratios": [0.0]}, "keep_ratios: must be in"),
    ({"contexts": [2048, 16]}, "contexts: each must be at least twice the window, 64 tokens"),
    ({"facts_per_document": [4, 0]}, "facts_per_document"),
    ({"facts_per_document": [1, 21]}, r"facts_per_document: must be counts in \[1, 20\]"),
    ({"policies": ["lava", "kvzip"], "observe": ["tail"]}, "kvzip scores only by reconstruct"),
    ({"policies": ["kvzip"], "modes": ["query_aware"]}, "kvzip scores only by reconstruct"),
    ({"keep_ratios": [0.2, 0.2]}, "keep_ratios: give distinct values"),
    ({"policies": ["lava", "snapkv", "lava"]}, "name one policy twice under reconstruct"),
    # A policy that reads no scores is built once, with the runtime's window of 32.
    ({"policies": ["streamingllm", "streamingllm:window=32"]}, "name one policy twice \\(options"),
    ({"policies": ["lava", "lava:layer_budget=global"]}, "name one policy twice"),  # the default, spelled out
    # Under reconstruct a policy's window is the source's 8 unless its spec sets one.
    ({"policies": ["lava", "lava:window=8"], "observe": ["reconstruct"], "modes": ["compress_once"]},
     "name one policy twice under reconstruct"),
    ({"contexts": [2048, 2048], "questions": [4, 4]}, "contexts: give distinct values"),
    ({"tasks": []}, "tasks: give at least one"),
    # A window of half a document or more would keep (nearly) all of it at every ratio.
    ({"policies": ["streamingllm:window=48"], "contexts": [2048, 64], "questions": [4, 4]},
     r"streamingllm:window=48: its window of 48 tokens needs contexts of at least 96 tokens, got \[2048, 64\]"),
    # Window queries score it (query_aware by default, tail, branches): there are only 32 of them.
    ({"policies": ["lava:window=64"]}, "lava:window=64: its window of 64 tokens is wider than the 32 window "
                                       "queries that score it under tail"),
    ({"policies": ["snapkv:window=48"], "observe": ["reconstruct", "branches"], "modes": ["compress_once"]},
     "under branches"),
])
def test_quality_config_validation(changes, message):
    with pytest.raises(ConfigFieldError, match=message) as refused:
        QualityConfig(**changes).validate()
    assert refused.value.field_name == next(iter(changes))  # the CLI names the field's flag


def test_two_specs_that_build_different_policies_or_sources_are_both_run():
    QualityConfig(policies=["lava", "lava:window=32"], observe=["reconstruct"], modes=["compress_once"]).validate()
    QualityConfig(policies=["streamingllm", "streamingllm:window=8"], observe=["reconstruct"]).validate()
    QualityConfig(policies=["lava"], observe=["branches", "branches:combine=max"], branch_combine="mean").validate()
    # A repetition's scores, or none read: a wider window than the observation window's is fine.
    QualityConfig(policies=["lava:window=64", "kvzip:window=64"], observe=["reconstruct"],
                  modes=["compress_once"]).validate()
    QualityConfig(policies=["streamingllm:window=64"]).validate()


def test_a_cell_of_one_fidelity_question_is_written_as_strict_json():
    import json
    from types import SimpleNamespace

    from lava_sglang.bench.quality import _Cells

    cells = _Cells()
    cells.add(("fidelity", 1024, "compress_once", "reconstruct", "all", "lava", 0.2), (0.05, 0.9),
              SimpleNamespace(plan=SimpleNamespace(keep_ratio=0.2)), 0, 0)
    (record,) = cells.records()
    assert record["kl_ci95"] == [0.0, None] and record["ci95"] == [0.0, 1.0]  # one question: nothing of the spread
    json.dumps(record, allow_nan=False)  # no Infinity for strict JSON readers


def test_a_fidelity_cells_intervals_are_taken_over_its_documents():
    from types import SimpleNamespace

    from lava_sglang.bench.quality import _Cells

    cells = _Cells()
    prefix = SimpleNamespace(plan=SimpleNamespace(keep_ratio=0.2))
    for document, question, kl, top1 in [(0, 0, 0.1, 0.9), (0, 1, 0.1, 0.9), (1, 0, 0.3, 0.5), (1, 1, 0.3, 0.5),
                                         (2, 0, 0.2, 0.7)]:
        cells.add(("fidelity", 1024, "compress_once", "reconstruct", "all", "lava", 0.2), (kl, top1), prefix,
                  document, question)
    (record,) = cells.records()
    documents = [0, 0, 1, 1, 2]
    assert record["ci95"] == list(mean_interval([0.9, 0.9, 0.5, 0.5, 0.7], documents, low=0.0, high=1.0))
    assert record["kl_ci95"] == list(mean_interval([0.1, 0.1, 0.3, 0.3, 0.2], documents, low=0.0))
    assert record["ci95"] != list(mean_interval([0.9, 0.9, 0.5, 0.5, 0.7], low=0.0, high=1.0))  # not over questions


def test_a_retrieval_cell_counts_its_right_answers_per_document():
    from types import SimpleNamespace

    from lava_sglang.bench.quality import _Cells

    cells = _Cells()
    prefix = SimpleNamespace(plan=SimpleNamespace(keep_ratio=0.2))
    for document, question, right in [(0, 0, True), (0, 1, False), (2, 1, True), (0, 2, True), (2, 0, True),
                                       (3, 0, False)]:
        cells.add(("retrieval", 1024, "compress_once", "reconstruct", "all", "lava", 0.2), right, prefix, document,
                  question)
    (record,) = cells.records()
    assert record["by_document"] == [[0, 2, 3], [2, 2, 2], [3, 0, 1]]
    assert record["right_questions"] == [[0, 0], [0, 2], [2, 0], [2, 1]]  # which ones, in order
    assert record["accuracy"] == 4 / 6
