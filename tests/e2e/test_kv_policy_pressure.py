"""`--kv-policy lava` under memory pressure (CPU engine, SmolLM2, fp32, KV pool capped low).

Documents of ~440 tokens against a 1200-token pool: a few fit, so running programs over
more documents makes SGLang evict, compressed prefixes included. Prefill runs in chunks of
128 tokens, so every document is captured across chunks.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import time

import pytest
import requests
import e2e_support
from e2e_support import store_stats

from lava_sglang.bench.documents import Document, prompt_parts, retrieval_documents
from lava_sglang.sglang_plugin.server_process import ServerProcess

pytestmark = pytest.mark.model

MAX_TOTAL_TOKENS = 1200
CHUNKED_PREFILL = 128
DOCUMENT_TOKENS = 400
NUM_DOCUMENTS = 8
ANSWER_TOKENS = 12
# The soak's size; the size is LAVA_SOAK_PROGRAMS=200 LAVA_SOAK_DOCUMENTS=20 (~15 min on 2 cores).
SOAK_PROGRAMS = int(os.environ.get("LAVA_SOAK_PROGRAMS", "24"))
SOAK_DOCUMENTS = int(os.environ.get("LAVA_SOAK_DOCUMENTS", str(NUM_DOCUMENTS)))
BUDGET = 0.25
SERVER_ARGS = ["--dtype", "float32", "--max-total-tokens", str(MAX_TOTAL_TOKENS), "--enable-cache-report",
               "--chunked-prefill-size", str(CHUNKED_PREFILL),
               "--kv-policy", "lava", "--kv-budget", str(BUDGET), "--kv-compress-on", "fork,shared",
               "--kv-observe", "tail"]  # compressed at commit: this module tests the cache under pressure


@pytest.fixture(scope="module")
def documents(tokenizer):
    count = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
    return [retrieval_documents(count, DOCUMENT_TOKENS, [3], seed=seed)[0]
            for seed in range(max(NUM_DOCUMENTS, SOAK_DOCUMENTS))]


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("sglang") / "pressure.log"
    with ServerProcess(smollm2_path, SERVER_ARGS, log_path=log_path) as process:
        yield process


def ask(url: str, document, num_questions: int, with_meta: bool = False):
    answers, meta_info = e2e_support.ask(url, document, range(num_questions), ANSWER_TOKENS)
    return (answers, meta_info) if with_meta else answers


def assert_all_memory_free(url: str) -> None:
    deadline = time.monotonic() + 120  # SGLang refuses to flush while requests still run
    while requests.post(url + "/flush_cache", timeout=60).status_code != 200:
        assert time.monotonic() < deadline, "/flush_cache kept failing: requests still running"
        time.sleep(1)
    stats = store_stats(url)
    assert stats["pool_available"] == MAX_TOTAL_TOKENS
    assert (stats["entries"], stats["borrowed_slots"], stats["evictable"], stats["protected"]) == (0, 0, 0, 0)


def test_an_evicted_document_is_recompressed_with_the_same_answers(server, documents, smollm2_path):
    assert_all_memory_free(server.url)
    first_answers, first_meta = ask(server.url, documents[0], 3, with_meta=True)
    for document in documents[1:]:
        ask(server.url, document, 3)
    stats = store_stats(server.url)
    assert stats["evictions"] >= 1, "the pool cap did not force any eviction"
    assert stats["entries"] < NUM_DOCUMENTS
    compressions = stats["compressions"]
    # Document 0 was the least recently used: it was evicted, is recomputed and recompressed.
    assert ask(server.url, documents[0], 3) == first_answers
    assert store_stats(server.url)["compressions"] == compressions + 1
    assert mismatches(reference_rows(smollm2_path, server.url, documents,
                                     question_records(0, first_answers, first_meta))) == []
    assert_all_memory_free(server.url)


def test_ordinary_leaves_are_evicted_before_a_compressed_document(server, documents):
    """A compressed document older than a long plain prompt outlives it when memory runs
    short: ordinary leaves go first (by LRU alone the document would go)."""
    assert_all_memory_free(server.url)
    answers = ask(server.url, documents[0], 3)
    before = store_stats(server.url)
    sampling = {"max_new_tokens": 4, "temperature": 0}
    # Plain prompts of ~900 tokens, the first one twice: each needs the previous one's room.
    cached = []
    for first, second in ((1, 2), (3, 4), (1, 2)):
        response = requests.post(server.url + "/generate", timeout=300, json={
            "text": documents[first].text + documents[second].text, "sampling_params": sampling})
        assert response.status_code == 200, response.text
        cached.append(response.json()["meta_info"]["cached_tokens"])
    assert cached[2] < 400, cached  # the first prompt (~900 tokens) was evicted to make room for the second
    stats = store_stats(server.url)
    assert stats["entries"] == 1 and stats["evictions"] == before["evictions"]
    assert ask(server.url, documents[0], 3) == answers
    assert store_stats(server.url)["compressions"] == before["compressions"]  # read from the cache
    assert_all_memory_free(server.url)


def reference_rows(smollm2_path, server_url: str, documents, questions: list[dict]) -> list[dict]:
    """Each question's server answer beside the reference runtime's (fp32, greedy; the decoded
    texts compared, `identical`) with the server's policy options: a question read through a compressed copy
    against the reference's compressed prefix, one that recomputed its document against the
    full cache (`bench serve-reference`'s comparison)."""
    from lava_sglang.bench.serve_reference import reference_answers
    from lava_sglang.reference import ReferenceRuntime

    policy = requests.get(server_url + "/server_info", timeout=60).json()["internal_states"][0]["lava_kv_policy"]
    keys = ("policy_spec", "budget", "window", "pool_kernel", "alpha", "min_prefix")
    record = {"policy": "lava", "question_records": questions, "kv_policy_options": {key: policy[key] for key in keys}}
    return reference_answers(ReferenceRuntime.load(smollm2_path, window=policy["window"]), documents, record,
                             ANSWER_TOKENS, progress=False)


def mismatches(rows: list[dict]) -> list[tuple[str, str]]:
    return [(row["server_answer"], row["reference_answer"]) for row in rows if not row["identical"]]


def question_records(document_index: int, answers: list[str], meta_info: list[dict]) -> list[dict]:
    return [{"document": document_index, "question": q, "answer": answer, "expected": None, "correct": None,
             "cached_tokens": meta["cached_tokens"], "prompt_tokens": meta["prompt_tokens"]}
            for q, (answer, meta) in enumerate(zip(answers, meta_info))]


def test_soak_concurrent_programs_over_more_documents_than_fit(server, documents, smollm2_path):
    """Programs with random numbers of forks over more documents than fit, from 3 clients (so
    requests are retracted and documents evicted and recompressed): every answer is the
    reference runtime's, the server logs no exception, and a flush frees everything."""
    assert_all_memory_free(server.url)
    before = store_stats(server.url)
    rng = random.Random(0)
    workload = [(rng.randrange(SOAK_DOCUMENTS), rng.randint(1, 3)) for _ in range(SOAK_PROGRAMS)]
    with concurrent.futures.ThreadPoolExecutor(3) as clients:
        results = list(clients.map(lambda item: ask(server.url, documents[item[0]], item[1], with_meta=True),
                                   workload))
    answers = [program_answers for program_answers, _ in results]
    stats = store_stats(server.url)
    compressions = stats["compressions"] - before["compressions"]
    documents_used = len({document for document, _ in workload})
    print(f"soak: {len(workload)} programs over {documents_used} documents, "
          f"{sum(forks for _, forks in workload)} questions, {compressions} compressions "
          f"({compressions - documents_used} recompressions), {stats['evictions'] - before['evictions']} "
          f"evictions, errors 0")
    assert [len(program) for program in answers] == [forks for _, forks in workload]
    questions = [record for (document, _), (program_answers, meta_info) in zip(workload, results)
                 for record in question_records(document, program_answers, meta_info)]
    assert mismatches(reference_rows(smollm2_path, server.url, documents, questions)) == []
    assert stats["evictions"] > before["evictions"]
    assert "Traceback" not in server.log_path.read_text()  # SGLang logs every exception with its traceback
    assert requests.get(server.url + "/health_generate", timeout=120).status_code == 200
    assert_all_memory_free(server.url)


def test_a_long_ordinary_request_decodes_beside_requests_on_a_compressed_document(server, documents, smollm2_path):
    """Mixed batches: a long plain generation (no compressed prefix) decodes while a program's
    branches read a compressed document in the same batches. The plain answer is its answer
    alone; the branches' answers are the reference runtime's."""
    url = server.url
    plain = {"text": documents[7].text, "sampling_params": {"max_new_tokens": 160, "temperature": 0,
                                                           "ignore_eos": True}}

    def generate_plain() -> tuple[str, float]:
        response = requests.post(url + "/generate", json=plain, timeout=600)
        assert response.status_code == 200, response.text
        return response.json()["text"], time.monotonic()

    assert_all_memory_free(url)
    alone, _ = generate_plain()
    assert_all_memory_free(url)
    ask(url, documents[0], 1)  # the document is committed and compressed
    with concurrent.futures.ThreadPoolExecutor(1) as client:
        plain_run = client.submit(generate_plain)
        time.sleep(1.0)  # the plain request is decoding
        answers, meta_info = ask(url, documents[0], 3, with_meta=True)
        program_ended = time.monotonic()
        beside, plain_ended = plain_run.result()
    assert plain_ended > program_ended, "the plain request ended before the branches: no mixed batch"
    assert all(meta["cached_tokens"] > 0 for meta in meta_info)
    assert beside == alone
    assert mismatches(reference_rows(smollm2_path, url, documents, question_records(0, answers, meta_info))) == []
    assert_all_memory_free(url)


def test_requests_retracted_on_a_compressed_document_resume_and_answer_as_the_reference(smollm2_path, documents,
                                                                                        tmp_path):
    """SGLang's own test switch (SGLANG_TEST_RETRACT) retracts a decoding request every third
    decode step: a program's branches on a compressed document are retracted, their rows
    released uncached, and resumed (re-prefilled after the compressed prefix). Every answer
    is the reference runtime's, and nothing leaks."""
    log_path = tmp_path / "retract.log"
    with ServerProcess(smollm2_path, SERVER_ARGS, log_path=log_path, env={"SGLANG_TEST_RETRACT": "1"}) as server:
        ask(server.url, documents[0], 1)  # the document is committed and compressed
        answers, meta_info = ask(server.url, documents[0], 3, with_meta=True)
        assert re.search(r"Testing retraction\. #retracted_reqs: [1-9]", log_path.read_text()), "nothing retracted"
        assert all(meta["cached_tokens"] > 0 for meta in meta_info)
        rows = reference_rows(smollm2_path, server.url, documents, question_records(0, answers, meta_info))
        assert all(row["compressed"] for row in rows) and mismatches(rows) == []
        assert_all_memory_free(server.url)


def test_bad_and_abandoned_requests_leave_nothing_behind(server, documents, smollm2_path):
    """An empty prompt, a prompt longer than the pool, a prefix too short to compress and a
    client that disconnects mid-stream: each is served or refused alone, nothing leaks."""
    assert_all_memory_free(server.url)
    url = server.url
    sampling = {"max_new_tokens": ANSWER_TOKENS, "temperature": 0}
    empty = requests.post(url + "/generate", json={"text": "", "sampling_params": sampling}, timeout=120)
    too_long = requests.post(url + "/generate", timeout=120, json={
        "text": documents[0].text * 8, "sampling_params": sampling})
    assert empty.status_code == 400 and too_long.status_code == 400, (empty.text, too_long.text)
    assert "longer than" in too_long.text or "exceed" in too_long.text, too_long.text

    compressions = store_stats(url)["compressions"]
    short_document = Document(text="A short note.", questions=documents[0].questions)
    short, short_meta = ask(url, short_document, 2, with_meta=True)
    assert store_stats(url)["compressions"] == compressions  # below --kv-min-prefix: served uncompressed
    rows = reference_rows(smollm2_path, url, [short_document], question_records(0, short, short_meta))
    assert not any(row["compressed"] for row in rows) and mismatches(rows) == []

    long_answer = {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}
    with requests.post(url + "/generate", stream=True, timeout=120, json={
            "text": documents[1].text, "sampling_params": long_answer, "stream": True}) as stream:
        next(stream.iter_lines())  # the first chunk arrives, then the client goes away
    ask(url, documents[2], 1)  # the server goes on serving
    assert requests.get(url + "/health_generate", timeout=120).status_code == 200
    assert_all_memory_free(url)


def stream_then_disconnect(url: str, text: str) -> None:
    """A generation the client abandons after its first streamed chunk."""
    sampling = {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}
    with requests.post(url + "/generate", stream=True, timeout=120,
                       json={"text": text, "sampling_params": sampling, "stream": True}) as stream:
        next(stream.iter_lines())


def test_aborts_around_compression_leave_nothing_behind(server, documents, smollm2_path, tokenizer):
    """A forked branch abandoned mid-decode over a compressed document, and an abandoned
    request whose release is the one that compresses a shared prefix (compression runs in
    the scheduler loop when a request is released, so an abort is handled before or after
    it, never inside): the document's answers do not change, the next request on the
    shared prefix answers as the reference runtime does on the same compression, the server
    goes on serving, and a flush frees everything."""
    assert_all_memory_free(server.url)
    url = server.url
    document = documents[3]
    answers = ask(url, document, 2)
    compressions = store_stats(url)["compressions"]
    prefix, _ = prompt_parts(document.text, "")
    stream_then_disconnect(url, prefix + prompt_parts("", document.questions[0].text)[1])
    assert ask(url, document, 2) == answers
    assert store_stats(url)["compressions"] == compressions  # the branch read the stored copy

    # --kv-compress-on shared: the second request over a plain prompt prefix recomputes its
    # last window and compresses the prefix when it is released, here by the abort.
    shared = documents[4].text
    prompts = [shared + f"\nQuestion {number}?" for number in ("one", "two", "three")]
    first_ids, second_ids, third_ids = (tokenizer(prompt).input_ids for prompt in prompts)
    shared_len = next(i for i, (a, b) in enumerate(zip(first_ids, second_ids)) if a != b)
    requests.post(url + "/generate", timeout=300, json={
        "text": prompts[0], "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    stream_then_disconnect(url, prompts[1])
    deadline = time.monotonic() + 60  # the abort reaches the scheduler after the client leaves
    while store_stats(url)["compressions"] == compressions and time.monotonic() < deadline:
        time.sleep(0.5)
    assert store_stats(url)["compressions"] == compressions + 1  # compressed by the abandoned request's release
    response = requests.post(url + "/generate", timeout=300, json={
        "text": prompts[2], "sampling_params": {"max_new_tokens": ANSWER_TOKENS, "temperature": 0}})
    assert response.status_code == 200, response.text
    third = response.json()
    assert third["meta_info"]["cached_tokens"] == shared_len  # the compressed prefix, nothing below it
    assert e2e_support.generated_ids(third) == e2e_support.reference_ids_on_a_compressed_prefix(
        smollm2_path, url, third_ids, shared_len, ANSWER_TOKENS)
    assert requests.get(url + "/health_generate", timeout=120).status_code == 200
    assert "Traceback" not in server.log_path.read_text()
    assert_all_memory_free(url)


def test_chunked_prefill_compresses_to_the_reference_plan(server, documents, smollm2_path):
    """Documents prefilled in 128-token chunks (three or four chunks each) are compressed to
    the plan the reference runtime makes from one unchunked prefill: every answer read
    through the compressed copy is the reference's answer."""
    assert_all_memory_free(server.url)
    questions = []
    for index in (5, 6):
        answers, meta_info = ask(server.url, documents[index], 3, with_meta=True)
        assert meta_info[0]["prompt_tokens"] > 3 * CHUNKED_PREFILL
        questions += question_records(index, answers, meta_info)
    rows = reference_rows(smollm2_path, server.url, documents, questions)
    assert all(row["compressed"] and row["prompt_tokens_match"] for row in rows)
    assert mismatches(rows) == []
