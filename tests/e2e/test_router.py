"""Two `--kv-policy lava` servers behind SGLang's router with cache-aware routing (CPU engine,
SmolLM2, fp32, the plugin's defaults).

Fork programs over several documents arrive at the router. Cache-aware routing sends every
request of a document (the program's commit and its branches; the repetition's chunks stay
on the server that runs them) to the server that saw the document first, and a new document
to the least loaded server, so each document is compressed once overall and later programs
read its compressed copy there.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest
from e2e_support import ask, planted_documents, prefix_tokens, store_stats

from lava_sglang.bench.serve import main
from lava_sglang.sglang_plugin.server_process import RouterProcess, ServerProcess

pytestmark = pytest.mark.model

ANSWER_TOKENS = 8
NUM_DOCUMENTS = 4
SERVER_ARGS = ["--dtype", "float32", "--enable-cache-report", "--kv-policy", "lava", "--max-total-tokens", "8192"]


@pytest.fixture(scope="module")
def documents(tokenizer):
    return planted_documents(tokenizer, 350, range(NUM_DOCUMENTS))


@pytest.fixture(scope="module")
def servers(smollm2_path, tmp_path_factory):
    logs = tmp_path_factory.mktemp("router")
    with ServerProcess(smollm2_path, SERVER_ARGS, log_path=logs / "server-a.log") as first, \
            ServerProcess(smollm2_path, SERVER_ARGS, log_path=logs / "server-b.log") as second, \
            RouterProcess([first.url, second.url], log_path=logs / "router.log") as router:
        yield router, [first, second]


def compressions(servers) -> int:
    return sum(store_stats(server.url)["compressions"] for server in servers)


def test_each_document_is_compressed_once_over_two_servers(servers, documents, tokenizer):
    router, workers = servers
    before = compressions(workers)
    # First visits arrive together: the router sends a new document (no cached share above its
    # threshold) to the least loaded server, so overlapping arrivals spread the documents.
    with concurrent.futures.ThreadPoolExecutor(NUM_DOCUMENTS) as clients:
        list(clients.map(lambda document: ask(router.url, document, [0, 1], ANSWER_TOKENS), documents))
    deadline = time.monotonic() + 300  # a repetition may outlive its program's branches
    while compressions(workers) < before + NUM_DOCUMENTS and time.monotonic() < deadline:
        time.sleep(1)
    assert compressions(workers) == before + NUM_DOCUMENTS
    entries = [store_stats(server.url)["entries"] for server in workers]
    assert sum(entries) == NUM_DOCUMENTS and min(entries) >= 1, entries  # each document on one server, both used

    for document in documents:
        _, meta_info = ask(router.url, document, [2, 3], ANSWER_TOKENS)
        # The compressed copy holds the commit's first n - 1 tokens (SGLang recomputes a prompt's last).
        assert all(meta["cached_tokens"] >= prefix_tokens(tokenizer, document) - 1 for meta in meta_info), meta_info
    assert compressions(workers) == before + NUM_DOCUMENTS  # none compressed again on the other server


def test_bench_serve_through_the_router_reports_documents_per_server(servers, tmp_path):
    router, workers = servers
    code = main(["--url", router.url, "--documents", "2", "--questions", "2", "--questions-per-visit", "1",
                 "--order", "interleaved", "--clients", "2", "--context", "350", "--max-tokens", "7",
                 "--sample-interval", "0.5", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    [record] = json.loads((tmp_path / "serving.json").read_text())["records"]
    assert record["policy"] == "lava" and not record["errors"] and record["visits"] == 4
    assert [server["url"] for server in record["servers"]] == sorted(server.url for server in workers)
    assert record["compressions"] == sum(server["compressions"] for server in record["servers"])
    assert record["capacity_tokens"] == 2 * 8192
    assert record["revisit_hit_rate"] == 1.0  # each document's second visit reached the server that holds it
    assert "| lava |" in (tmp_path / "serving.md").read_text()
