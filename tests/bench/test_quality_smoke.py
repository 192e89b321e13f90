"""The quality benchmark end to end on SmolLM2, small enough for CI (a couple of minutes)."""

import json

import pytest

from lava_sglang.bench.quality import QualityBenchmark, QualityConfig
from lava_sglang.bench.report import write_quality_report

pytestmark = pytest.mark.model

POLICIES = ["lava", "snapkv"]
RATIOS = [0.2, 0.5]


@pytest.fixture(scope="module")
def result(runtime):
    # About 1K-token documents: 4 with one planted fact each, and 4 open questions.
    config = QualityConfig(contexts=[1024], questions=[4], policies=POLICIES, keep_ratios=RATIOS,
                           facts_per_document=[1], seed=0, observe=["tail"])
    return QualityBenchmark(runtime, config).run(progress=False)


def record(records, task, mode, policy, ratio):
    (found,) = [r for r in records if (r["task"], r["mode"], r["policy"], r["keep_ratio"], r["split"]) == (
        task, mode, policy, ratio, "all")]
    assert found["n_questions"] == 4
    return found


def test_every_cell_is_reported_with_its_interval(result):
    cells = {(r["task"], r["mode"], r["observe"], r["split"], r["policy"], r["keep_ratio"]) for r in result["records"]}
    expected_configs = [("full", 1.0)] + [(p, r) for p in POLICIES for r in RATIOS]
    # One fact per retrieval document: its question is at compression in every other document;
    # fidelity asks 4 (2 and 2).
    splits = {task: ("at_compression", "later", "all") for task in ("retrieval", "fidelity")}
    assert cells == {(task, mode, "tail", split, policy, ratio) for task in ("retrieval", "fidelity")
                     for mode in ("compress_once", "query_aware") for split in splits[task]
                     for policy, ratio in expected_configs}
    for r in result["records"]:
        metric = r["accuracy"] if r["task"] == "retrieval" else r["top1"]
        assert r["ci95"][0] - 1e-9 <= metric <= r["ci95"][1] + 1e-9
        if r["policy"] != "full":
            assert abs(r["measured_keep_ratio"] - r["keep_ratio"]) < 0.05


def test_full_cache_answers_single_planted_facts(result):
    for mode in ("compress_once", "query_aware"):
        assert record(result["records"], "retrieval", mode, "full", 1.0)["accuracy"] >= 0.75


def test_a_larger_budget_stays_closer_to_the_full_cache(result):
    for mode in ("compress_once", "query_aware"):
        for policy in POLICIES:
            small = record(result["records"], "fidelity", mode, policy, 0.2)
            large = record(result["records"], "fidelity", mode, policy, 0.5)
            assert large["kl"] < small["kl"]
            assert 0 < small["kl"]


def test_report_files(result, tmp_path):
    paths = write_quality_report(result, tmp_path, "pytest")
    records = json.loads(paths[0].read_text())
    assert isinstance(records, list) and {"task", "context_tokens", "mode", "observe", "split", "policy",
                                          "keep_ratio", "n_questions", "ci95"} <= set(records[0])
    assert "| tail · lava |" in paths[1].read_text()
    assert paths[2].read_bytes().startswith(b"\x89PNG")
