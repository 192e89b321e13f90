"""Which compressed copy each visit of a `--kv-observe branches` serving run read; which
prefix rows a compressed hit is answered after; which checkpoint the reference answers
with; a results file that is not there."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lava_sglang.reference as reference
from lava_sglang.bench.serve_reference import (compressing_visits, markdown, observing_questions, options_spec,
                                               recorded_model, reference_answers, run, run_model, server_dtypes,
                                               summary)
from lava_sglang.bench.serve_workload import Visit, program_inputs
from lava_sglang.model import smollm2_location


def visit(index: int, document: int, commit_cached: int, prefix_tokens: int = 1000) -> dict:
    return {"visit": index, "document": document, "commit_cached_tokens": commit_cached,
            "prefix_tokens": prefix_tokens}


def test_a_visit_reads_the_copy_its_documents_last_prefill_compressed():
    record = {"visit_records": [
        visit(0, 0, 0),      # document 0 prefilled: its branches ran on the full prefix
        visit(1, 1, 0),      # document 1 prefilled
        visit(2, 0, 999),    # document 0 hit: the copy visit 0's branches observed
        visit(4, 0, 0),      # document 0 evicted meanwhile and prefilled again
        visit(3, 1, 999),    # (visits are taken in index order whatever the list order)
        visit(5, 0, 999),    # the copy visit 4's branches observed
        visit(6, 2, 999),    # a hit on a document never prefilled in this run (an earlier run's copy)
    ]}
    assert compressing_visits(record) == {0: None, 1: None, 2: 0, 3: 1, 4: None, 5: 4, 6: None}


def test_a_visit_of_more_branches_than_observe_a_prefix_is_marked_a_guess_and_reported():
    # The server observes with the first 8 branches it matches, which the run does not record.
    record = {"question_records": [{"visit": 0, "question": index} for index in range(10)]
              + [{"visit": 1, "question": index} for index in range(3)]}
    wide, guessed = observing_questions(record, 0)
    assert [question["question"] for question in wide] == list(range(8)) and guessed
    assert observing_questions(record, 1) == (record["question_records"][10:], False)
    assert observing_questions(record, None) == ([], False)
    row = {"expected": "1234567", "server_correct": True, "reference_correct": True, "compressed": True,
           "identical": True, "prompt_tokens_match": True, "observers_guessed": False}
    rows = {"lava": [row, {**row, "observers_guessed": True}], "snapkv": [row]}
    summaries = [summary(policy, policy_rows) for policy, policy_rows in rows.items()]
    assert [item["observers_guessed"] for item in summaries] == [1, 0]
    report = markdown(Path("serving.json"), summaries, rows)
    assert "not run in fp32" not in report
    meta = {"servers": {"none": {"args": ["--kv-policy", "none", "--dtype", "float32"]},
                        "snapkv": {"args": ["--kv-policy", "snapkv"]}, "lava": {"log": None},
                        # a user's --server-args follow the command's flags, and SGLang takes the last
                        "kvzip": {"args": ["--dtype", "float32", "--kv-policy", "kvzip", "--dtype", "bfloat16"]},
                        "pyramidkv": {"args": ["--dtype", "float32", "--dtype=bfloat16"]}}}
    assert server_dtypes(meta) == {"none": "float32", "snapkv": "auto", "lava": "unknown", "kvzip": "bfloat16",
                                   "pyramidkv": "bfloat16"}
    meta["servers"] = {policy: meta["servers"][policy] for policy in ("none", "snapkv", "lava")}
    assert ("**Servers not run in fp32** (snapkv auto, lava unknown): the reference runs in fp32" in
            markdown(Path("serving.json"), summaries, rows, server_dtypes(meta)))
    assert "observed by a visit of more than 8 questions" in report and "may differ: lava 1." in report
    assert "observed by a visit" not in markdown(Path("serving.json"), summaries[1:], {"snapkv": [row]})
    # A prompt the reference tokenized to another length (documents from another Python's pydoc_data) is said.
    assert "tokenized to another length" not in report
    rows["snapkv"] = [{**row, "prompt_tokens_match": False}]
    summaries = [summary(policy, policy_rows) for policy, policy_rows in rows.items()]
    assert "tokenized to another length than the server reported** (not the same prompt: their comparison does " \
           "not hold): snapkv 1." in markdown(Path("serving.json"), summaries, rows)


@dataclasses.dataclass
class StubPlan:
    seq_len: int
    kept: list


class StubRuntime:
    """Characters as tokens; a compressed prefix keeps its even positions. Records the options
    each compression was asked with, and the prefix length, whether its rows were compressed
    and the suffix each answer was generated after."""

    def __init__(self):
        self.tokenizer = StubTokenizer()
        self.compressions = []
        self.generated = []

    def prefill(self, ids):
        return SimpleNamespace(seq_len=len(ids), token_ids=list(ids))

    def compress(self, capture, policy, budget, **options):
        self.compressions.append((policy, budget, options))
        return SimpleNamespace(plan=StubPlan(capture.seq_len, [[torch.arange(0, capture.seq_len, 2)]]))

    def full_prefix(self, capture):
        return SimpleNamespace(plan=StubPlan(capture.seq_len, [[torch.arange(capture.seq_len)]]))

    def generate(self, prefixes, suffix_ids, max_tokens):
        (kept,), = prefixes[0].kept
        rows_compressed = len(kept) < prefixes[0].seq_len
        self.generated.append((prefixes[0].seq_len, rows_compressed, self.tokenizer.decode(suffix_ids)))
        return [self.tokenizer("1234567").input_ids]


class StubTokenizer:
    def __call__(self, text):
        return SimpleNamespace(input_ids=[ord(character) for character in text])

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(token) for token in ids)


def test_a_compressed_hit_is_answered_after_the_first_n_minus_1_tokens_whatever_was_cached(monkeypatch):
    # The compressed node holds the prefix's first n - 1 tokens; the last one (and anything
    # after it) a hit found cached was computed over the compressed rows by an earlier
    # request, so the reference computes it after them too, not from the full prefill.
    monkeypatch.setattr(reference, "CompressedPrefix", SimpleNamespace(from_plan=lambda capture, plan: plan))
    document = SimpleNamespace(text="a document of some length", questions=[SimpleNamespace(text="which code?")])
    prefix = program_inputs(document, Visit(0, 0, (0,), 0))[0]
    n = len(prefix)
    options = {"policy_spec": "lava", "observe": "tail", "budget": 0.2, "window": 8, "pool_kernel": 1,
               "alpha": 0.2, "min_prefix": 4}
    questions = [{"document": 0, "question": 0, "visit": visit, "cached_tokens": cached, "answer": "1234567",
                  "expected": "1234567", "correct": True, "prompt_tokens": None}
                 for visit, cached in enumerate([0, n - 1, n, n + 3])]
    record = {"policy": "lava", "kv_policy_options": options, "question_records": questions}
    runtime = StubRuntime()
    rows = reference_answers(runtime, [document], record, max_tokens=4, progress=False)
    assert [row["compressed"] for row in rows] == [False, True, True, True]
    assert [row["keep_len"] for row in rows] == [n, n - 1, n - 1, n - 1]
    assert [row["kept_rows"] for row in rows] == [n] + [len(range(0, n - 1, 2))] * 3  # the stub keeps every other
    question = program_inputs(document, Visit(0, 0, (0,), 0))[1][0]
    assert runtime.generated == [(n, False, question)] + [(n - 1, True, prefix[-1] + question)] * 3
    # Compressed once, as the server ran it: its policy, budget, window and options.
    assert runtime.compressions == [("lava", 0.2, {"observation": None, "window": 8, "pool_kernel": 1, "alpha": 0.2})]
    # Without fork commits (--kv-compress-on shared) a hit's cached tokens were all computed
    # over the full prefix, and the prefix is compressed with them.
    record["kv_policy_options"] = {**options, "compress_on": ["shared"]}
    rows = reference_answers(StubRuntime(), [document], record, max_tokens=4, progress=False)
    assert [row["keep_len"] for row in rows] == [n, n - 1, n, n]


def test_the_reference_answers_with_the_serving_runs_own_checkpoint(tmp_path):
    results = Path("serving.json")
    assert run_model(None, None, results) is None  # the default SmolLM2, as the run had
    assert run_model(None, str(smollm2_location()), results) is None  # the same, named
    assert run_model(str(tmp_path), None, results) == str(tmp_path)
    assert run_model(str(tmp_path), str(tmp_path / ".." / tmp_path.name), results) == str(tmp_path)
    with pytest.raises(ValueError, match="serving.json was served by the default SmolLM2"):
        run_model(None, str(tmp_path), results)
    with pytest.raises(ValueError, match=f"served by {tmp_path}"):
        run_model(str(tmp_path), "/models/other", results)


@pytest.fixture
def no_model_loads(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the results file was checked")

    monkeypatch.setattr("lava_sglang.reference.ReferenceRuntime.load", load)


@pytest.mark.usefixtures("no_model_loads")
def test_a_results_file_that_is_not_there_is_refused_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError, match="no results file"):
        run(tmp_path / "serving.json")
    # Another command's results (a quality run's list of records, a serve-reference file) are refused in one line.
    for other in ([{"policy": "lava"}], {"results": "serving.json", "summaries": [], "answers": {}}):
        (tmp_path / "other.json").write_text(json.dumps(other))
        with pytest.raises(ValueError, match="other.json is not what `bench serve` writes"):
            run(tmp_path / "other.json")
    (tmp_path / "serving.json").write_text(json.dumps({"meta": {"config": {"model": None}}, "records": []}))
    with pytest.raises(ValueError, match="the reference must run the same checkpoint"):
        run(tmp_path / "serving.json", model=str(tmp_path))


@pytest.mark.usefixtures("no_model_loads")
def test_a_run_that_did_not_record_its_policys_options_is_refused_before_any_model_loads(tmp_path):
    # Its "lava" could be another allocation than today's default lava.
    record = {"policy": "lava", "kv_policy_options": {"policy": "lava", "budget": 0.2, "window": 32}}
    none = {"policy": "none", "kv_policy_options": {"policy": "none"}}
    (tmp_path / "serving.json").write_text(json.dumps({"meta": {"config": {"model": None}},
                                                       "records": [none, record]}))
    with pytest.raises(ValueError, match="the lava run did not record its policy's options"):
        run(tmp_path / "serving.json")
    record["kv_policy_options"]["policy_spec"] = "lava:layer_budget=entropy,window=32"
    assert options_spec(record) == "lava:layer_budget=entropy,window=32"


def test_a_url_run_is_checked_on_the_checkpoint_its_server_reported(tmp_path):
    served = {"config": {"url": "http://127.0.0.1:30000", "model": None},
              "servers": {"none": {"model_path": str(tmp_path)}, "lava": {"model_path": str(tmp_path)}}}
    assert recorded_model(served) == (str(tmp_path), True)
    assert recorded_model({"config": {"url": None, "model": "/m"}}) == ("/m", True)
    unknown = recorded_model({"config": {"url": "http://127.0.0.1:30000"}, "servers": {}})
    assert unknown == (None, False)
    results = Path("serving.json")
    assert run_model(*unknown[:1], "/models/qwen", results, known=unknown[1]) == "/models/qwen"  # taken on trust
    with pytest.raises(ValueError, match="does not say which checkpoint its server ran; give it with --model"):
        run_model(None, None, results, known=False)

