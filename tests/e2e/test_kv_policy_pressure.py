"""`--kv-policy lava` under memory pressure (CPU engine, SmolLM2, fp32, KV pool capped low).

Documents of ~440 tokens against a 1200-token pool: a few fit, so running programs over
more documents makes SGLang evict, compressed prefixes included.
"""

from __future__ import annotations

import concurrent.futures
import random
import time

import pytest
import requests
import sglang as sgl

from lava_sglang.bench.documents import Document, prompt_parts, retrieval_documents
from lava_sglang.frontend import multi_question_qa
from lava_sglang.sglang_plugin.server_process import ServerProcess

pytestmark = pytest.mark.model

MAX_TOTAL_TOKENS = 1200
DOCUMENT_TOKENS = 400
NUM_DOCUMENTS = 8
ANSWER_TOKENS = 12
SERVER_ARGS = ["--dtype", "float32", "--max-total-tokens", str(MAX_TOTAL_TOKENS), "--enable-cache-report",
               "--kv-policy", "lava", "--kv-budget", "0.25", "--kv-compress-on", "fork,shared"]


@pytest.fixture(scope="module")
def documents(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    count = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
    return [retrieval_documents(count, DOCUMENT_TOKENS, [3], seed=seed)[0] for seed in range(NUM_DOCUMENTS)]


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("sglang") / "pressure.log"
    with ServerProcess(smollm2_path, SERVER_ARGS, log_path=log_path) as process:
        yield process


def ask(url: str, document, num_questions: int) -> list[str]:
    prefix, _ = prompt_parts(document.text, "")
    suffixes = [prompt_parts("", question.text)[1] for question in document.questions[:num_questions]]
    state = multi_question_qa.run(prefix=prefix, suffixes=suffixes, max_tokens=ANSWER_TOKENS,
                                  backend=sgl.RuntimeEndpoint(url))
    return state["answers"]


def store_stats(url: str) -> dict:
    return requests.get(url + "/server_info", timeout=60).json()["internal_states"][0]["lava_kv_policy"]["store"]


def assert_all_memory_free(url: str) -> None:
    deadline = time.monotonic() + 120  # SGLang refuses to flush while requests still run
    while requests.post(url + "/flush_cache", timeout=60).status_code != 200:
        assert time.monotonic() < deadline, "/flush_cache kept failing: requests still running"
        time.sleep(1)
    stats = store_stats(url)
    assert stats["pool_available"] == MAX_TOTAL_TOKENS
    assert (stats["entries"], stats["borrowed_slots"], stats["evictable"], stats["protected"]) == (0, 0, 0, 0)


def test_an_evicted_document_is_recompressed_with_the_same_answers(server, documents):
    assert_all_memory_free(server.url)
    first_answers = ask(server.url, documents[0], 3)
    for document in documents[1:]:
        ask(server.url, document, 3)
    stats = store_stats(server.url)
    assert stats["evictions"] >= 1, "the pool cap did not force any eviction"
    assert stats["entries"] < NUM_DOCUMENTS
    compressions = stats["compressions"]
    # Document 0 was the least recently used: it was evicted, is recomputed and recompressed.
    assert ask(server.url, documents[0], 3) == first_answers
    assert store_stats(server.url)["compressions"] == compressions + 1
    assert_all_memory_free(server.url)


def test_soak_concurrent_programs_over_more_documents_than_fit(server, documents):
    """Programs with random numbers of forks over all documents from 3 clients: every one
    answers, the server logs no exception, and a flush frees everything."""
    assert_all_memory_free(server.url)
    rng = random.Random(0)
    workload = [(rng.randrange(NUM_DOCUMENTS), rng.randint(1, 3)) for _ in range(24)]
    with concurrent.futures.ThreadPoolExecutor(3) as clients:
        answers = list(clients.map(lambda item: ask(server.url, documents[item[0]], item[1]), workload))
    stats = store_stats(server.url)
    print(f"soak: {len(workload)} programs, {sum(forks for _, forks in workload)} questions, "
          f"{stats['compressions']} compressions, {stats['evictions']} evictions")
    assert [len(program) for program in answers] == [forks for _, forks in workload]
    assert all(answer.strip() for program in answers for answer in program)
    assert stats["evictions"] >= 1
    assert "Traceback" not in server.log_path.read_text()  # SGLang logs every exception with its traceback
    assert requests.get(server.url + "/health_generate", timeout=120).status_code == 200
    assert_all_memory_free(server.url)


def test_bad_and_abandoned_requests_leave_nothing_behind(server, documents):
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
    short = ask(url, Document(text="A short note.", questions=documents[0].questions), 2)
    assert all(answer.strip() for answer in short)
    assert store_stats(url)["compressions"] == compressions  # below --kv-min-prefix: served uncompressed

    long_answer = {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}
    with requests.post(url + "/generate", stream=True, timeout=120, json={
            "text": documents[1].text, "sampling_params": long_answer, "stream": True}) as stream:
        next(stream.iter_lines())  # the first chunk arrives, then the client goes away
    ask(url, documents[2], 1)  # the server goes on serving
    assert requests.get(url + "/health_generate", timeout=120).status_code == 200
    assert_all_memory_free(url)
