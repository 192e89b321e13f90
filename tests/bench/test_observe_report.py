"""Observation sources in the quality benchmark: records, splits, report, targets, CLI."""

import json
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from lava_sglang.bench.quality import (ConfigFieldError, QualityBenchmark, QualityConfig, middles_at_compression,
                                       split_of)
from lava_sglang.bench.report import markdown, normalise, paired_by_document, plot, targets, write_quality_report
from lava_sglang.cli import build_parser, main

SOURCES = ["tail", "branches", "reconstruct"]


@pytest.mark.parametrize("count, expected", [(1, ["at_compression"]), (2, ["at_compression", "later"]),
                                             (5, ["at_compression"] * 3 + ["later"] * 2)])
def test_first_half_of_the_questions_are_at_compression_and_the_middle_one_as_told(count, expected):
    assert [split_of(index, count) for index in range(count)] == expected
    middle_later = [split_of(index, count, middle_at_compression=False) for index in range(count)]
    assert middle_later == ["at_compression"] * (count // 2) + ["later"] * (count - count // 2)


@pytest.mark.parametrize("facts", [[1, 4, 8], [1, 4], [3, 4]])
def test_the_middle_questions_of_odd_counts_are_in_both_splits_alike(facts):
    # With facts 1, 4 one-question documents are every other one: alternating by document
    # position would put them all at compression.
    documents = [SimpleNamespace(questions=[None] * count) for count in facts * 4]
    middles = [middle for document, middle in zip(documents, middles_at_compression(documents))
               if len(document.questions) % 2]
    assert middles == [True, False, True, False]


def test_the_split_is_not_tied_to_where_the_facts_sit():
    # Facts are planted latest-first; without the shuffle, the question asked at compression
    # would always be about the fact nearest the document's end.
    def words(text, add_special_tokens=False):
        return {"input_ids": text.split()}

    runtime = type("Runtime", (), {"tokenizer": staticmethod(words)})()
    bench = QualityBenchmark(runtime, QualityConfig(contexts=[300], questions=[40], facts_per_document=[2]))
    at_compression_is_nearer_the_end = []
    for document in bench.documents("retrieval", 300, 40):
        first, second = (document.text.index(question.answer) for question in document.questions)
        at_compression_is_nearer_the_end.append(first > second)
    assert len(at_compression_is_nearer_the_end) == 20
    assert 5 <= sum(at_compression_is_nearer_the_end) <= 15


def test_a_partial_file_counts_the_questions_done_with_or_without_a_progress_bar(monkeypatch):
    from lava_sglang.bench import quality

    def words(text, add_special_tokens=False):
        return {"input_ids": text.split()}

    runtime = SimpleNamespace(tokenizer=words, model=SimpleNamespace(config=SimpleNamespace(
        max_position_embeddings=8192)))
    monkeypatch.setattr(quality, "run_metadata", lambda runtime, config, wall_seconds: {})
    written = []  # questions_done of each partial file, one per document of 2 questions
    monkeypatch.setattr(quality, "replace_file", lambda path, text: written.append(
        json.loads(text)["meta"]["questions_done"]))
    for progress in (False, True):
        bench = QualityBenchmark(runtime, QualityConfig(contexts=[300], questions=[6], facts_per_document=[2],
                                                        tasks=["retrieval"]))
        # Each document's questions answered, counted on the bar as the real one does.
        monkeypatch.setattr(bench, "run_document", lambda task, context, index, document, bar, **_: bar.update(
            len(document.questions)))
        bench.run(progress=progress, partial=Path("partial.json"))
    assert written == [2, 4, 6] * 2


def test_documents_the_model_cannot_hold_or_facts_they_cannot_hold_are_refused_before_the_first_question():
    def words(text, add_special_tokens=False):
        return {"input_ids": text.split()}

    def runtime(positions):
        return SimpleNamespace(tokenizer=words, model=SimpleNamespace(
            config=SimpleNamespace(max_position_embeddings=positions)))

    def refused(bench) -> ConfigFieldError:
        bench.run_document = lambda *args, **kwargs: pytest.fail("a question ran")
        with pytest.raises(ConfigFieldError) as error:
            bench.run(progress=False)
        return error.value

    config = QualityConfig(contexts=[300], questions=[2], facts_per_document=[2], tasks=["retrieval"])
    beyond = refused(QualityBenchmark(runtime(300), config))  # 300 document tokens, a question, an answer
    assert beyond.field_name == "contexts"
    assert re.fullmatch(r"300: a prompt of \d+ tokens and a 24-token answer exceed the model's 300 positions",
                        beyond.message)  # a retrieval answer's cap; a fidelity answer's is 32
    crowded = refused(QualityBenchmark(runtime(8192), replace(config, contexts=[64], questions=[8],
                                                              facts_per_document=[8])))
    assert crowded.field_name == "facts_per_document"
    assert "give more tokens or fewer facts (contexts 64)" in crowded.message


def test_cli_rejects_unknown_observation_sources_and_policy_options(capsys):
    with pytest.raises(SystemExit):  # argparse's own refusal, naming the flag
        main(["bench", "quality", "--observe", "tail", "question"])
    assert ("argument --observe: a source must be one of tail, branches, reconstruct, optionally with options "
            "(name:field=value,...), got 'question'") in capsys.readouterr().err
    for policy, message in (("h2o", "a policy must be one of lava, kvzip"),
                            ("full", "'full': the full cache is always run as the reference")):
        with pytest.raises(SystemExit):
            main(["bench", "quality", "--policies", "lava", policy])
        assert f"argument --policies: {message}" in capsys.readouterr().err
    assert main(["bench", "quality", "--policies", "lava:budget=3"]) == 2
    assert "options must be field=value with a field of lava" in capsys.readouterr().err
    args = build_parser().parse_args(["bench", "quality", "--observe", "branches", "reconstruct:normalize=local"])
    assert args.observe == ["branches", "reconstruct:normalize=local"]
    assert args.branch_combine is None  # QualityConfig's max unless given, and refused where no branches read it


def test_a_runtime_observing_another_window_than_the_config_is_refused():
    # The runtime's window is the one observed: the config's would only be recorded.
    with pytest.raises(ConfigFieldError, match="runtime observes windows of 16 tokens") as refused:
        QualityBenchmark(SimpleNamespace(tokenizer=None, window=16), QualityConfig())
    assert refused.value.field_name == "window"
    assert QualityBenchmark(SimpleNamespace(tokenizer=None, window=32), QualityConfig()).config.window == 32


def test_kvzip_is_paired_with_repetition_sources_only():
    config = QualityConfig(policies=["lava", "kvzip", "streamingllm"], keep_ratios=[0.2],
                           observe=["tail", "reconstruct", "reconstruct:normalize=local"])
    bench = QualityBenchmark(SimpleNamespace(tokenizer=None), config)
    assert bench.scored_by("tail") == [("lava", 0.2)]
    assert bench.scored_by("reconstruct:normalize=local") == [("lava", 0.2), ("kvzip", 0.2)]


@pytest.mark.parametrize("changes, message", [
    ({"observe": ["tail", "bogus"]}, "observe must be one of"),
    ({"observe": ["reconstruct:chunk_tokens=0"]}, "chunk_tokens must be an int >= 1"),
    ({"policies": ["lava:layer_budget=none"]}, "layer_budget must be one of"),
    ({"policies": ["lava", "full"]}, "do not list it"),
    ({"observe": []}, "observe: give at least one source"),
    ({"observe": ["tail", "tail"]}, "name one source twice"),
    ({"observe": ["reconstruct", "reconstruct:chunk_tokens=512"]}, "name one source twice"),
    ({"branch_combine": "sum"}, "branch_combine: must be one of"),
    ({"query_aware_splits": ["all"]}, "query_aware_splits: unknown"),
    ({"seed": -1}, "seed: must be >= 0"),
])
def test_config_rejects_bad_observation_options(changes, message):
    with pytest.raises(ConfigFieldError, match=message) as refused:
        QualityConfig(**changes).validate()
    assert refused.value.field_name == next(iter(changes))  # the CLI names the field's flag


def retrieval(mode, observe, split, policy, ratio, hits, n=10):
    return {"task": "retrieval", "context_tokens": 1024, "mode": mode, "observe": observe, "split": split,
            "policy": policy, "keep_ratio": ratio, "n_questions": n, "measured_keep_ratio": ratio,
            "accuracy": hits / n, "ci95": [0.0, 1.0]}


def synthetic_records():
    records = []
    for split in ("at_compression", "later"):
        records.append(retrieval("compress_once", "tail", split, "full", 1.0, 9))
        for ratio in (0.2, 0.4):
            records.append(retrieval("compress_once", "tail", split, "streamingllm", ratio, 2))
            for source, hits in (("tail", 1), ("branches", 6 if split == "at_compression" else 3), ("reconstruct", 8)):
                for policy, bonus in (("lava", 0), ("snapkv", -1), ("ada_snapkv", 0)):
                    records.append(retrieval("compress_once", source, split, policy, ratio, hits + bonus))
        for ratio in (0.2, 0.4):
            records.append(retrieval("query_aware", "tail", "at_compression", "lava", ratio, 5))
    return records


CONFIG = {"contexts": [1024], "questions": [20], "tasks": ["retrieval"], "modes": ["compress_once", "query_aware"],
          "keep_ratios": [0.2, 0.4], "observe": SOURCES, "branch_combine": "max", "seed": 0, "window": 32,
          "retrieval_answer_tokens": 24, "fidelity_answer_tokens": 32, "facts_per_document": [2]}


def test_targets_state_met_or_not_with_the_figures():
    lines = "\n".join(targets(synthetic_records(), CONFIG))
    assert ("1024 tokens, keep 0.2, questions present at compression: lava+branches 6/10 vs lava per question "
            "5/10: **met**") in lines
    assert ("keep 0.4, later questions: best source reconstruct 8/10 vs tail 1/10 (x2 = 2) and streamingllm 2/10: "
            "**met**") in lines
    # 8 >= 0.8 x 9 = 7.2, but lava (8) only ties ada_snapkv (8): not beaten.
    assert ("stretch, 1024 tokens, keep 0.4, later: best source reconstruct 8/10 vs 0.8 x full = 7.2 (full 9/10): "
            "**met**; lava beats snapkv 7 and ada_snapkv 8 with reconstruct: **not met**") in lines
    # A run without ada_snapkv: no verdict on beating it.
    without = [record for record in synthetic_records() if record["policy"] != "ada_snapkv"]
    assert ("lava beats snapkv 7 and ada_snapkv - with reconstruct: n/a (not run)"
            in "\n".join(targets(without, CONFIG)))


def test_report_tables_have_a_row_per_source_and_policy(tmp_path):
    meta = {"model": "m", "model_shape": {"layers": 1, "q_heads": 1, "kv_heads": 1, "head_dim": 1},
            "dtype": "float32", "transformers": "t", "torch": "t", "machine": "m", "wall_seconds": 60,
            "config": CONFIG, "model_seconds": {"prefill": 10.0, "reconstruct": 25.0, "branches": 1.0},
            "kept_window": {"tail": 32, "branches": 32, "reconstruct": 8}}
    text = markdown(synthetic_records(), meta, "cmd", "notes")
    assert "; window 32, 8 under reconstruct\n" in text
    assert "| branches · lava | 0.60 [0.00, 1.00] | 0.60 [0.00, 1.00] | 0.30 [0.00, 1.00] |" in text
    assert "| per question · lava | 0.50 [0.00, 1.00] | 0.50 [0.00, 1.00] |  |  |" in text
    assert "reconstruct +2.50x (25 s)" in text
    paths = write_quality_report({"records": synthetic_records(), "meta": meta}, tmp_path, "cmd")
    assert paths[2].read_bytes().startswith(b"\x89PNG")


def test_a_positional_policy_with_options_has_one_row_not_one_per_source(tmp_path):
    # streamingllm given as a spec: recorded under every source like streamingllm, and like it
    # reported once; the old runs' unregistered `none` counts as scored.
    records = [retrieval("compress_once", source, "all", policy, 0.2, hits)
               for source in ("tail", "reconstruct") for policy, hits in (("streamingllm:window=8", 2), ("none", 1))]
    records.append(retrieval("compress_once", "tail", "all", "full", 1.0, 9))
    config = {**CONFIG, "modes": ["compress_once"], "observe": ["tail", "reconstruct"], "keep_ratios": [0.2]}
    meta = {"model": "m", "model_shape": {"layers": 1, "q_heads": 1, "kv_heads": 1, "head_dim": 1},
            "dtype": "float32", "transformers": "t", "torch": "t", "machine": "m", "wall_seconds": 60, "config": config}
    text = markdown(records, meta, "cmd", None)
    assert "Cut short" not in text
    assert "**Cut short:** 5 of 20 questions" in markdown(records, {**meta, "questions_done": 5}, "cmd", None)
    assert "| streamingllm:window=8 | 0.20 [0.00, 1.00] |" in text
    assert "· streamingllm:window=8" not in text
    assert "| tail · none |" in text and "| reconstruct · none |" in text
    paths = write_quality_report({"records": records, "meta": meta}, tmp_path, "cmd")
    assert paths[2].read_bytes().startswith(b"\x89PNG")


def test_old_records_read_as_tail_over_all_questions():
    old = {k: v for k, v in retrieval("compress_once", "tail", "all", "lava", 0.2, 3).items()
           if k not in ("observe", "split")}
    (record,) = normalise([old])
    assert record["observe"] == "tail" and record["split"] == "all"
    config = {**CONFIG, "modes": ["compress_once"]}
    del config["observe"]
    meta = {"model": "m", "model_shape": {"layers": 1, "q_heads": 1, "kv_heads": 1, "head_dim": 1},
            "dtype": "float32", "transformers": "t", "torch": "t", "machine": "m", "wall_seconds": 60,
            "config": config}
    assert "| tail · lava | 0.30 [0.00, 1.00] |" in markdown([old], meta, "cmd", None)
    assert "- Machine: m\n" in markdown([old], meta, "cmd", None)  # a run before the code was recorded
    # Fidelity intervals were normal ones before 2026-12-06, Student-t over questions until
    # 2026-12-07, over documents since: each run's label from its record.
    assert "95% normal intervals over questions (a run before 2026-12-06)." in markdown([old], meta, "cmd", None)
    assert ("95% Student-t intervals over questions (a run made before they were taken over documents, "
            "2026-12-07).") in markdown([old], dict(meta, fidelity_interval="student-t"), "cmd", None)
    assert "95% Student-t intervals over documents" in markdown(
        [old], dict(meta, fidelity_interval="student-t-documents"), "cmd", None)
    assert "- Machine: m; lava-sglang 0123456789ab\n" in markdown([old], dict(meta, code="0123456789ab"), "cmd", None)


@pytest.mark.model
def test_every_source_and_split_is_recorded(runtime, tmp_path):
    # A 160-token document with two planted facts: one question at compression, one later.
    config = QualityConfig(contexts=[160], questions=[2], policies=["lava", "streamingllm"], keep_ratios=[0.5],
                           modes=["compress_once"], tasks=["retrieval"], observe=SOURCES, facts_per_document=[2],
                           retrieval_answer_tokens=4)
    result = QualityBenchmark(runtime, config).run(progress=False)
    cells = {(r["observe"], r["split"], r["policy"]) for r in result["records"]}
    assert cells == {(source, split, policy) for source in SOURCES for split in ("at_compression", "later", "all")
                     for policy in ("full", "lava", "streamingllm")}
    assert all(r["n_questions"] == (2 if r["split"] == "all" else 1) for r in result["records"])
    assert {"prefill", "branches", "reconstruct"} <= set(result["meta"]["model_seconds"])
    assert result["meta"]["kept_window"] == {source: 8 if source == "reconstruct" else 32 for source in SOURCES}
    for record in result["records"]:  # one document: its right answers and questions are the cell's
        assert record["by_document"] == [[0, round(record["accuracy"] * record["n_questions"]), record["n_questions"]]]
    paths = write_quality_report(result, tmp_path, "pytest")
    assert json.loads(paths[0].read_text())[0]["observe"] in SOURCES


@pytest.mark.model
def test_each_right_answer_is_recorded_as_its_document_and_question(runtime, monkeypatch):
    # Two documents of two questions (the first of each asked at compression), every
    # configuration right on the first document's second question and the second's first.
    config = QualityConfig(contexts=[160], questions=[4], policies=["lava"], keep_ratios=[0.5],
                           modes=["compress_once"], tasks=["retrieval"], observe=["tail"], facts_per_document=[2],
                           retrieval_answer_tokens=4)
    benchmark = QualityBenchmark(runtime, config)
    asked = []

    def two_right(prefixes, suffix_ids, answer):
        asked.append(answer)
        return [len(asked) in (2, 3)] * len(prefixes)

    monkeypatch.setattr(benchmark, "_retrieval", two_right)
    records = benchmark.run(progress=False)["records"]
    assert {(r["split"], r["policy"]): r["right_questions"] for r in records} == {
        (split, policy): {"at_compression": [[1, 0]], "later": [[0, 1]], "all": [[0, 1], [1, 0]]}[split]
        for split in ("at_compression", "later", "all") for policy in ("full", "lava")}


@pytest.mark.model
def test_a_branches_spec_with_options_falls_back_to_the_tail_where_no_branch_ran(runtime):
    # Two one-question documents: the second's question comes later, so it has no branch at
    # compression and its source is the tail. The check read the spec's text, so
    # "branches:include_tail=false" asked for branches that never ran, and the run stopped.
    config = QualityConfig(contexts=[160], questions=[2], policies=["lava"], keep_ratios=[0.5],
                           modes=["compress_once"], tasks=["retrieval"], observe=["branches:include_tail=false"],
                           facts_per_document=[1], retrieval_answer_tokens=4)
    result = QualityBenchmark(runtime, config).run(progress=False)
    assert {(r["observe"], r["split"], r["policy"], r["n_questions"]) for r in result["records"]} == {
        ("branches:include_tail=false", split, policy, 2 if split == "all" else 1)
        for split in ("at_compression", "later", "all") for policy in ("full", "lava")}


def test_a_run_of_query_aware_cells_alone_is_reported_against_its_own_full_cache():
    records = [{**record, "observe": "tail"} for record in synthetic_records()
               if record["mode"] == "query_aware"]
    records.append(retrieval("query_aware", "tail", "at_compression", "full", 1.0, 8))
    meta = {"model": "m", "model_shape": {"layers": 1, "q_heads": 1, "kv_heads": 1, "head_dim": 1},
            "dtype": "float32", "transformers": "t", "torch": "t", "machine": "m", "wall_seconds": 60,
            "config": {**CONFIG, "modes": ["query_aware"]}}
    text = markdown(records, meta, "cmd", None)
    assert "| full | 0.80 [0.00, 1.00] | 0.80 [0.00, 1.00] |" in text
    assert "Observation sources" not in text  # no compress_once cell read one
    assert "| per question · lava | 0.62 | 0.62 |" in text  # 5 of 8 of the full cache's


def test_the_share_of_the_full_cache_has_an_interval_over_the_documents_where_they_are_recorded():
    full = retrieval("compress_once", "reconstruct", "all", "full", 1.0, 10, n=20)
    lava = retrieval("compress_once", "reconstruct", "all", "lava", 0.2, 5, n=20)
    config = {**CONFIG, "modes": ["compress_once"], "observe": ["reconstruct"], "keep_ratios": [0.2]}
    meta = {"model": "m", "model_shape": {"layers": 1, "q_heads": 1, "kv_heads": 1, "head_dim": 1},
            "dtype": "float32", "transformers": "t", "torch": "t", "machine": "m", "wall_seconds": 60, "config": config}
    assert "| reconstruct · lava | 0.50 |" in markdown([full, lava], meta, "cmd", None)  # older records: no interval
    # 5 documents of 2 questions, the full cache right on both, lava on one; one of 10, none right.
    full["by_document"] = [[document, 2, 2] for document in range(5)] + [[5, 0, 10]]
    lava["by_document"] = [[document, 1, 2] for document in range(5)] + [[5, 0, 10]]
    assert "| reconstruct · lava | 0.50 [0.50, 0.50] |" in markdown([full, lava], meta, "cmd", None)
    assert "the share also answered right" not in markdown([full, lava], meta, "cmd", None)  # questions not named
    # Named: lava right on the first question of each of the first 5 documents, and on the last
    # document's first, which the full cache missed: 5 of its 10 right answers kept, not 6.
    full["right_questions"] = [[document, question] for document in range(5) for question in (0, 1)]
    lava["right_questions"] = [[document, 0] for document in range(5)] + [[5, 0]]
    lava["by_document"][-1] = [5, 1, 10]
    lava["accuracy"] = 6 / 20
    text = markdown([full, lava], meta, "cmd", None)
    kept_table = text[text.index("the share also answered right"):]
    assert "| reconstruct · lava | 0.50 [0.50, 0.50] |" in kept_table and "| full | 1.00 |" in kept_table
    assert "| reconstruct · lava | 0.60 [" in text  # the ratio of right answers passes it
    lava["by_document"][-1] = [6, 0, 10]  # a document the full cache was not asked about
    with pytest.raises(ValueError, match="document 6: 10 questions in the lava cell, 0 in the full cell"):
        paired_by_document(lava, full)


def test_the_plot_draws_streamingllm_per_question_beside_its_compress_once_line(tmp_path, monkeypatch):
    # Not the same cells: per question, the question takes the recent window and the ratio is of the longer prompt.
    from matplotlib.figure import Figure

    legend_labels = []
    original_legend = Figure.legend
    monkeypatch.setattr(Figure, "legend", lambda figure, handles, labels, **options: legend_labels.extend(labels)
                        or original_legend(figure, handles, labels, **options))
    records = synthetic_records() + [retrieval("query_aware", "tail", "at_compression", "streamingllm", ratio, 3)
                                     for ratio in (0.2, 0.4)]
    plot(records, CONFIG, tmp_path / "quality.png")
    assert {"streamingllm", "per question · streamingllm", "per question · lava"} <= set(legend_labels)
