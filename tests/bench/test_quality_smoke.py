"""The quality benchmark end to end on SmolLM2, small enough for CI (about two minutes)."""

import json

import pytest

from lava_sglang.bench.quality import QualityBenchmark, QualityConfig
from lava_sglang.bench.report import write_quality_report

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def result(runtime):
    # 2 documents x 4 planted facts at about 1K tokens.
    config = QualityConfig(contexts=[1024], questions=[8], policies=["lava", "snapkv"], keep_ratios=[0.5],
                           tasks=["retrieval"], seed=0)
    benchmark = QualityBenchmark(runtime, config)
    benchmark.documents = lambda task, context, count: _two_documents_of_four(benchmark, context)
    return benchmark.run(progress=False)


def _two_documents_of_four(benchmark, context):
    from lava_sglang.bench.documents import retrieval_documents

    return retrieval_documents(benchmark._count_tokens, context, [4, 4], seed=0)


def accuracy(records, mode, policy):
    (record,) = [r for r in records if r["mode"] == mode and r["policy"] == policy]
    assert record["n_questions"] == 8
    assert record["ci95"][0] <= record["accuracy"] <= record["ci95"][1]
    return record["accuracy"]


def test_every_cell_is_reported(result):
    cells = {(r["mode"], r["policy"], r["keep_ratio"]) for r in result["records"]}
    assert cells == {(mode, policy, ratio) for mode in ("compress_once", "query_aware")
                     for policy, ratio in (("full", 1.0), ("lava", 0.5), ("snapkv", 0.5))}
    lava = [r for r in result["records"] if r["policy"] == "lava"]
    assert all(0.45 <= r["measured_keep_ratio"] <= 0.55 for r in lava)


def test_full_cache_answers_the_planted_facts(result):
    assert accuracy(result["records"], "compress_once", "full") >= 0.75


def test_question_aware_scoring_keeps_what_compress_once_loses(result):
    # The finding behind issue 7: scored by the document's own ending, the window policies
    # drop facts that scoring with the question keeps.
    for policy in ("lava", "snapkv"):
        assert accuracy(result["records"], "query_aware", policy) > accuracy(result["records"], "compress_once", policy)


def test_report_files(result, tmp_path):
    result["meta"]["command"] = "pytest"
    paths = write_quality_report(result, tmp_path, "pytest")
    records = json.loads(paths[0].read_text())
    assert isinstance(records, list) and {"task", "context_tokens", "mode", "policy", "keep_ratio", "n_questions",
                                          "accuracy", "ci95"} <= set(records[0])
    assert "| lava |" in paths[1].read_text()
    assert paths[2].read_bytes().startswith(b"\x89PNG")
