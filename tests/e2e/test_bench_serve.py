"""`lava-sglang bench serve` end to end on one CPU-engine server: a tiny workload, policy lava."""

from __future__ import annotations

import json

import pytest

from lava_sglang.bench.serve import main

pytestmark = pytest.mark.model


def test_bench_serve_writes_a_complete_report(smollm2_path, tmp_path):
    code = main(["--policies", "lava", "--documents", "1", "--questions", "2", "--context", "512",
                 "--max-tokens", "12", "--clients", "2", "--max-total-tokens", "4096", "--max-seconds", "240",
                 "--sample-interval", "1", "--out", str(tmp_path), "--log-dir", str(tmp_path / "logs"),
                 "--server-args=--kv-observe tail", "--no-progress"])  # one visit: compressed at its commit
    assert code == 0, (tmp_path / "logs" / "lava.log").read_text()[-3000:]
    assert {p.name for p in tmp_path.iterdir()} >= {"serving.json", "serving.md", "serving.png"}
    result = json.loads((tmp_path / "serving.json").read_text())
    meta = result["meta"]
    assert meta["versions"]["sglang"] and meta["machine"] and meta["device"]
    assert meta["servers"]["lava"]["args"][:2] == ["--kv-policy", "lava"]
    assert "--max-total-tokens" in meta["servers"]["lava"]["args"]
    assert meta["workload"]["documents"] == 1 and meta["workload"]["questions_per_document"] == 2
    [record] = result["records"]
    assert record["policy"] == "lava" and not record["errors"] and not record["truncated"]
    assert (record["visits"], record["questions"]) == (1, 2)
    assert 0 <= record["accuracy"] <= 1 and len(record["accuracy_ci95"]) == 2
    # The document was prefilled once (by the fork's commit) and compressed once; both
    # questions read it from the cache.
    assert record["document_prefills"] == 1 and record["recomputations"] == 0
    assert record["compressions"] == 1 and record["compress_seconds_per_document"] > 0
    assert 0.5 < record["cached_token_share"] < 1
    assert all(q["cached_tokens"] >= q["prompt_tokens"] - 40 for q in record["question_records"])
    assert record["peak_store_entries"] == 1 and record["peak_store_bytes"] > 0
    assert record["capacity_tokens"] == 4096 and 0 < record["peak_pool_used_tokens"] <= 4096
    assert record["peak_kv_bytes"] == pytest.approx(record["peak_pool_used_tokens"] * record["bytes_per_token"])
    assert record["bytes_per_token"] == 30 * 3 * 64 * 2 * 4  # SmolLM2 in fp32: layers x KV heads x dim x (K, V)
    assert record["question_throughput"] > 0
    for latency in ("ttft", "e2e", "program_latency"):
        assert record[latency]["n"] >= 1 and 0 < record[latency]["p50"] <= record[latency]["p99"]
    assert record["ttft"]["p50"] <= record["e2e"]["p50"]
    assert "| lava |" in (tmp_path / "serving.md").read_text()
    # The same questions through the reference runtime (same document, plan options and
    # cached length) give the server's answers: the server reads the plan the reference makes.
    from lava_sglang.bench.serve_reference import run as run_reference

    json_path, md_path = run_reference(tmp_path / "serving.json", model=str(smollm2_path), progress=False)
    [summary] = json.loads(json_path.read_text())["summaries"]
    assert summary["compressed"] == 2 and summary["prompt_tokens_mismatches"] == 0
    assert summary["identical_answers"] == 2, md_path.read_text()
