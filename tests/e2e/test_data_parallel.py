"""A `--kv-policy lava --dp-size 2` server (CPU engine, SmolLM2, fp32, the plugin's defaults):
each data-parallel rank's radix cache compresses what it serves, and a repetition's chunks
reach the rank that holds the prefix (`routed_dp_rank`).

SGLang's own DP controller sends requests round robin, so a fork program's commit and its
branches land on different ranks: a branch away from the commit prefills the document for
itself, and in time every rank compresses its own copy. SGLang's router with `--dp-aware`
routes by prefix to one rank, so each document is compressed once.
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import requests
from e2e_support import ask_over_http, planted_documents, prefix_tokens

from lava_sglang.sglang_plugin.server_process import RouterProcess, ServerProcess

pytestmark = pytest.mark.model

ANSWER_TOKENS = 4
DOCUMENT_TOKENS = 350
DP_SIZE = 2
SERVER_ARGS = ["--dtype", "float32", "--enable-cache-report", "--kv-policy", "lava", "--max-total-tokens", "8192",
               "--dp-size", str(DP_SIZE)]


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    with ServerProcess(smollm2_path, SERVER_ARGS, log_path=tmp_path_factory.mktemp("dp") / "server.log") as server:
        yield server


def rank_stores(url: str) -> list[dict]:
    """Each rank's compressed store counters (/server_info lists one internal state per rank)."""
    states = requests.get(url + "/server_info", timeout=60).json()["internal_states"]
    return [state["lava_kv_policy"]["store"] for state in states]


def wait_for_compressions(url: str, count: int, timeout: float = 300) -> list[dict]:
    """The ranks' stores once `count` compressions are done in all (a repetition may outlive
    its program's branches), or at the deadline."""
    deadline = time.monotonic() + timeout
    while sum(store["compressions"] for store in rank_stores(url)) < count and time.monotonic() < deadline:
        time.sleep(1)
    return rank_stores(url)


def assert_observed_by_their_repetitions(stores: list[dict]) -> None:
    """Every compression on every rank was scored by its repetition: its chunks reached the
    rank holding the prefix (SGLang's controller would send them round robin). A rank whose
    commit found the document prefilled by a branch has no prefill to compare with."""
    for store in stores:
        cost = store["repetition_cost"]
        assert store["repetitions_cut_short"] == 0, store
        assert cost["documents"] + cost["not_compared"] == store["compressions"], store


def test_sglang_dp_controller_splits_a_program_over_the_ranks(server, tokenizer):
    [document] = planted_documents(tokenizer, DOCUMENT_TOKENS, [10])
    prefix_len = prefix_tokens(tokenizer, document)
    before = [store["compressions"] for store in rank_stores(server.url)]
    # Round robin: the commit and one branch on one rank, the other branch on the other rank,
    # which prefills the whole document for itself and keeps it uncompressed (no commit there).
    meta_info = ask_over_http(server.url, document, [0, 1], ANSWER_TOKENS)
    assert min(meta["cached_tokens"] for meta in meta_info) < prefix_len // 2, meta_info
    stores = wait_for_compressions(server.url, sum(before) + 1)
    assert sum(store["compressions"] for store in stores) == sum(before) + 1
    # The next program's commit lands on the other rank, which compresses the document too.
    ask_over_http(server.url, document, [2, 3], ANSWER_TOKENS)
    stores = wait_for_compressions(server.url, sum(before) + DP_SIZE)
    assert [store["compressions"] - done for store, done in zip(stores, before)] == [1] * DP_SIZE
    assert_observed_by_their_repetitions(stores)

    meta_info = ask_over_http(server.url, document, [0, 3], ANSWER_TOKENS)
    # Both ranks hold a compressed copy (its first n - 1 tokens: SGLang recomputes a prompt's last).
    assert all(meta["cached_tokens"] >= prefix_len - 1 for meta in meta_info), meta_info
    assert sum(store["compressions"] for store in rank_stores(server.url)) == sum(before) + DP_SIZE


def test_router_with_dp_aware_compresses_each_document_once_over_the_ranks(server, tokenizer, tmp_path):
    docs = planted_documents(tokenizer, DOCUMENT_TOKENS, range(20, 24))
    before = sum(store["compressions"] for store in rank_stores(server.url))
    with RouterProcess([server.url], log_path=tmp_path / "router.log", router_args=["--dp-aware"]) as router:
        # First visits arrive together: the router spreads new documents over the ranks.
        with concurrent.futures.ThreadPoolExecutor(len(docs)) as clients:
            list(clients.map(lambda document: ask_over_http(router.url, document, [0, 1], ANSWER_TOKENS), docs))
        stores = wait_for_compressions(server.url, before + len(docs))
        assert sum(store["compressions"] for store in stores) == before + len(docs)
        assert_observed_by_their_repetitions(stores)

        for document in docs:
            meta_info = ask_over_http(router.url, document, [2, 3], ANSWER_TOKENS)
            assert all(meta["cached_tokens"] >= prefix_tokens(tokenizer, document) - 1 for meta in meta_info)
        # none compressed again on another rank
        assert sum(store["compressions"] for store in rank_stores(server.url)) == before + len(docs)
