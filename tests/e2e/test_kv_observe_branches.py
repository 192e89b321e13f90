"""`--kv-observe branches` on the real server (CPU engine, SmolLM2, fp32).

A fork program's document is not compressed when it is committed: it waits while the
branches run on the full prefix, then is compressed once with the tail's and the branches'
observation windows, and later programs read the compressed copy, answering as the reference
runtime does with the same windows.
"""

from __future__ import annotations

import time

import pytest
import requests
from e2e_support import ask, kv_state, run_record, store_stats

from lava_sglang.bench.documents import prompt_parts, retrieval_documents
from lava_sglang.sglang_plugin.server_process import ServerProcess

pytestmark = pytest.mark.model

# The longest a committed prefix waits for a branch (it is compressed once its branches end): one
# that no branch reached by then goes by its tail alone, as the second test checks by waiting it out;
# 5 s could pass before the first test's branches reached a loaded machine's scheduler.
OBSERVE_WAIT = 15
ANSWER_TOKENS = 12
SERVER_ARGS = ["--dtype", "float32", "--enable-cache-report", "--kv-policy", "lava", "--kv-budget", "0.25",
               "--kv-observe", "branches", "--kv-observe-wait", str(OBSERVE_WAIT)]


@pytest.fixture(scope="module")
def documents(tokenizer):
    count = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
    return [retrieval_documents(count, 600, [4], seed=seed)[0] for seed in (0, 1)]


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("sglang") / "branches.log"
    with ServerProcess(smollm2_path, SERVER_ARGS, log_path=log_path) as process:
        yield process


def flush(url: str) -> dict:
    assert requests.post(url + "/flush_cache", timeout=60).status_code == 200
    stats = store_stats(url)
    assert (stats["entries"], stats["evictable"], stats["protected"], stats["pending"]) == (0, 0, 0, 0)
    return stats


def test_a_document_is_compressed_once_after_its_branches_ran(server, documents, tokenizer, smollm2_path):
    capacity = flush(server.url)["pool_available"]
    document = documents[0]
    prefix_tokens = len(tokenizer(prompt_parts(document.text, "")[0]).input_ids)
    answers, meta_info = ask(server.url, document, range(3), ANSWER_TOKENS)
    assert len(answers) == 3 and all(answer.strip() for answer in answers)
    stats = store_stats(server.url)
    assert (stats["compressions"], stats["entries"], stats["pending"]) == (1, 1, 0)
    log = server.log_path.read_text()
    assert "waits for its branches" in log
    assert "observed by its tail and 3 branch window(s)" in log
    # The branches ran on the full prefix (all of it cached), which is then gone: the tree
    # holds the compressed copy's slots (a quarter of the rows), not the document.
    assert all(meta["cached_tokens"] >= prefix_tokens for meta in meta_info)
    assert stats["protected"] == 0 and stats["evictable"] == stats["borrowed_slots"] < prefix_tokens / 2

    # A later program reads the compressed copy and compresses nothing.
    later, later_meta = ask(server.url, document, range(1, 4), ANSWER_TOKENS)
    assert all(answer.strip() for answer in later)
    assert all(meta["cached_tokens"] >= prefix_tokens - 1 for meta in later_meta)
    assert store_stats(server.url)["compressions"] == 1

    # Both visits answer as the reference runtime: the first on the full prefix, the second on
    # the copy planned from the tail and the first visit's three questions as branches.
    from lava_sglang.bench.serve_reference import reference_answers
    from lava_sglang.reference import ReferenceRuntime

    options = kv_state(server.url)
    record = run_record("lava", options, prefix_tokens, [(range(3), answers, meta_info),
                                                         (range(1, 4), later, later_meta)])
    rows = reference_answers(ReferenceRuntime.load(smollm2_path, window=options["window"]), [document], record,
                             ANSWER_TOKENS, progress=False)
    assert [row["compressed"] for row in rows] == [False] * 3 + [True] * 3
    assert all(row["prompt_tokens_match"] and not row["observers_guessed"] for row in rows)
    assert all(row["identical"] for row in rows), [(row["server_answer"], row["reference_answer"]) for row in rows]
    assert flush(server.url)["pool_available"] == capacity


def test_a_prefix_whose_branches_never_come_is_compressed_after_the_wait(server, documents):
    flush(server.url)
    compressions = store_stats(server.url)["compressions"]
    prefix, _ = prompt_parts(documents[1].text, "")
    # What fork() sends to commit a prefix; then no branch comes.
    committed_at = time.monotonic()
    commit = requests.post(server.url + "/generate", timeout=300,
                           json={"text": prefix, "sampling_params": {"max_new_tokens": 0}})
    assert commit.status_code == 200, commit.text
    stats = store_stats(server.url)
    assert (stats["pending"], stats["compressions"]) == (1, compressions)
    assert stats["evictable"] >= commit.json()["meta_info"]["prompt_tokens"]  # cached, not pinned
    assert stats["protected"] == 0
    # No request comes either: the idle scheduler compresses the prefix with its tail window
    # alone once its wait has passed.
    deadline = time.monotonic() + OBSERVE_WAIT + 60
    while (stats := store_stats(server.url))["pending"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert time.monotonic() - committed_at >= OBSERVE_WAIT
    assert (stats["pending"], stats["compressions"], stats["entries"]) == (0, compressions + 1, 1)
    assert "observed by its tail and 0 branch window(s)" in server.log_path.read_text()
    flush(server.url)
