"""`--kv-policy` on the real SGLang server (CPU engine without a GPU, SmolLM2, fp32).

A frontend program commits a ~1K-token document and forks one branch per question. The
server's own view of its memory comes from /server_info (`internal_states[0]
["lava_kv_policy"]["store"]`: the compressed store and SGLang's pool counters).
"""

from __future__ import annotations

import concurrent.futures

import pytest
import requests
import sglang as sgl
from e2e_support import (answer_ids, generated_ids, kv_state, metric, metrics_text,
                          reference_ids_on_a_compressed_prefix, run_record, store_stats)

from lava_sglang.bench.documents import prompt_parts, retrieval_documents
from lava_sglang.frontend import multi_question_qa
from lava_sglang.policy import make_policy
from lava_sglang.sglang_plugin.server_process import ServerProcess

pytestmark = pytest.mark.model

MAX_TOTAL_TOKENS = 8192
NUM_LAYERS, NUM_KV_HEADS = 30, 3  # SmolLM2-135M
ANSWER_TOKENS = 16
WINDOW = 32  # --kv-window's default under --kv-observe tail
BASE_ARGS = ["--dtype", "float32", "--max-total-tokens", str(MAX_TOTAL_TOKENS), "--enable-cache-report"]


@pytest.fixture(scope="module")
def document(tokenizer):
    return retrieval_documents(lambda text: len(tokenizer(text).input_ids), 1000, [4], seed=0)[0]


@pytest.fixture(scope="module")
def program_inputs(document):
    prefix, _ = prompt_parts(document.text, "")
    suffixes = [prompt_parts("", question.text)[1] for question in document.questions]
    return prefix, suffixes


@pytest.fixture(scope="module")
def prefix_tokens(tokenizer, program_inputs) -> int:
    return len(tokenizer(program_inputs[0]).input_ids)


def run_program(url: str, program_inputs) -> tuple[list[str], list[dict]]:
    prefix, suffixes = program_inputs
    state = multi_question_qa.run(prefix=prefix, suffixes=suffixes, max_tokens=ANSWER_TOKENS,
                                  backend=sgl.RuntimeEndpoint(url))
    return state["answers"], state["meta_info"]


def flush(url: str) -> None:
    assert requests.post(url + "/flush_cache", timeout=60).status_code == 200


def serve(smollm2_path, tmp_path, name: str, args: list[str]) -> ServerProcess:
    return ServerProcess(smollm2_path, BASE_ARGS + args, log_path=tmp_path / f"{name}.log")


def test_budget_covering_the_document_leaves_it_to_stock_sglang(smollm2_path, tmp_path, program_inputs,
                                                               prefix_tokens, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setenv("SGLANG_PLUGINS", "stock-only")  # a whitelist naming no plugin: stock SGLang
        with serve(smollm2_path, tmp_path, "stock", []) as server:
            stock_answers, _ = run_program(server.url, program_inputs)
    with serve(smollm2_path, tmp_path, "none", ["--kv-policy", "none"]) as server:
        none_answers, _ = run_program(server.url, program_inputs)
        none_state = requests.get(server.url + "/server_info", timeout=60).json()["internal_states"][0]
    full_budget = ["--kv-policy", "lava", "--kv-budget", "1.0", "--kv-observe", "tail"]
    with serve(smollm2_path, tmp_path, "lava-full", full_budget) as server:
        lava_answers, meta_info = run_program(server.url, program_inputs)
        stats = store_stats(server.url)
        lava_state = requests.get(server.url + "/server_info", timeout=60).json()["internal_states"][0]
    assert all(answer.strip() for answer in stock_answers)
    assert none_answers == stock_answers
    # --kv-policy none reports SGLang's pool (no store): the document and answers are cached.
    pool = none_state["lava_kv_policy"]["pool"]
    assert "store" not in none_state["lava_kv_policy"]
    # The policy as it ran, every field spelled out (bench serve-reference plans with it).
    assert none_state["lava_kv_policy"]["policy_spec"] is None
    assert make_policy(lava_state["lava_kv_policy"]["policy_spec"]) == make_policy("lava", window=32)
    assert pool["evictable"] >= prefix_tokens and pool["protected"] == 0
    assert pool["pool_available"] + pool["evictable"] == none_state["memory_usage"]["token_capacity"]
    assert lava_answers == stock_answers
    # A budget that keeps every row would store a second full copy: the document stays in the
    # main pool, as stock SGLang keeps it, and every fork reads it from there.
    assert stats["compressions"] == 0 and stats["entries"] == 0 and stats["stored_rows"] == 0
    assert all(meta["cached_tokens"] >= prefix_tokens - 1 for meta in meta_info)


@pytest.fixture(scope="module")
def lava_server(smollm2_path, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("sglang") / "lava.log"
    # Compressed at commit (the tail window): this module tests the radix cache and the attention.
    args = ["--kv-policy", "lava", "--kv-budget", "0.25", "--kv-compress-on", "fork,shared", "--kv-observe", "tail",
            "--enable-metrics"]
    with ServerProcess(smollm2_path, BASE_ARGS + args, log_path=log_path) as server:
        flush(server.url)
        server.initial_stats = store_stats(server.url)
        yield server


def test_document_is_compressed_once_and_reused_by_every_fork(lava_server, program_inputs, prefix_tokens, document,
                                                             smollm2_path):
    flush(lava_server.url)
    answers, meta_info = run_program(lava_server.url, program_inputs)
    stats = store_stats(lava_server.url)
    compressed_tokens = prefix_tokens - 1  # a request always recomputes its last prompt token
    assert stats["compressions"] == 1 and stats["entries"] == 1
    assert stats["prefix_tokens"] == compressed_tokens
    assert all(meta["cached_tokens"] >= compressed_tokens for meta in meta_info)
    assert len(answers) == 4 and all(answer.strip() for answer in answers)
    full_rows = NUM_LAYERS * NUM_KV_HEADS * compressed_tokens
    assert 0.24 <= stats["stored_rows"] / full_rows <= 0.27
    # No full-length copy of the document is left in the main pool: what the tree holds
    # beyond the store's borrowed slots is the branches' own tokens.
    assert stats["evictable"] + stats["protected"] - stats["borrowed_slots"] < compressed_tokens // 4
    assert stats["borrowed_slots"] * NUM_LAYERS * NUM_KV_HEADS >= stats["stored_rows"]

    again, meta_again = run_program(lava_server.url, program_inputs)
    assert store_stats(lava_server.url)["compressions"] == 1  # reused, not compressed again
    assert all(meta["cached_tokens"] >= compressed_tokens for meta in meta_again)
    # Every branch of both runs read the copy, and answers as the reference runtime does on it.
    from lava_sglang.bench.serve_reference import reference_answers
    from lava_sglang.reference import ReferenceRuntime

    options = kv_state(lava_server.url)
    questions = range(len(answers))
    record = run_record("lava", options, prefix_tokens, [(questions, answers, meta_info),
                                                         (questions, again, meta_again)])
    rows = reference_answers(ReferenceRuntime.load(smollm2_path, window=options["window"]), [document], record,
                             ANSWER_TOKENS, progress=False)
    assert all(row["compressed"] and row["prompt_tokens_match"] for row in rows)
    assert all(row["identical"] for row in rows), [(row["server_answer"], row["reference_answer"]) for row in rows]
    # The copy holds exactly the reference plan's rows (a budget a few percent off answers alike).
    assert {row["kept_rows"] for row in rows} == {stats["stored_rows"]}


def generate(url: str, text: str) -> dict:
    response = requests.post(url + "/generate", timeout=300, json={
        "text": text, "sampling_params": {"max_new_tokens": ANSWER_TOKENS, "temperature": 0}})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_prompt_prefix_is_compressed_once_a_second_request_shares_it(lava_server, program_inputs, tokenizer,
                                                                        smollm2_path):
    url = lava_server.url
    prefix, suffixes = program_inputs
    prompts = [prefix + suffix for suffix in suffixes[:3]]
    first_ids, second_ids = (tokenizer(prompt).input_ids for prompt in prompts[:2])
    shared_len = next(i for i, (a, b) in enumerate(zip(first_ids, second_ids)) if a != b)
    flush(url)
    second_alone = generate(url, prompts[1])["text"]  # the full-cache answer
    flush(url)
    compressions = store_stats(url)["compressions"]

    first = generate(url, prompts[0])
    assert store_stats(url)["compressions"] == compressions  # one user: nothing to share yet
    second = generate(url, prompts[1])
    stats = store_stats(url)
    assert stats["compressions"] == compressions + 1 and stats["entries"] == 1
    assert stats["prefix_tokens"] == shared_len
    # The second request recomputed the shared prefix's last window (its observation) on the full cache.
    assert second["meta_info"]["cached_tokens"] == shared_len - WINDOW
    assert second["text"] == second_alone and first["text"].strip()
    # The full-length copy went back to the allocator; the requests' own tokens hang below the compressed node.
    assert stats["evictable"] + stats["protected"] - stats["borrowed_slots"] < shared_len // 4

    third = generate(url, prompts[2])
    again = generate(url, prompts[0])
    assert third["meta_info"]["cached_tokens"] == shared_len  # the three questions part at the same token
    assert generated_ids(third) == reference_ids_on_a_compressed_prefix(
        smollm2_path, url, tokenizer(prompts[2]).input_ids, shared_len, ANSWER_TOKENS)
    assert again["meta_info"]["cached_tokens"] >= len(first_ids) - 1  # the first request's tokens moved along
    assert store_stats(url)["compressions"] == compressions + 1


def test_requests_racing_over_a_shared_prefix_compress_it_once(lava_server, program_inputs):
    """Three requests arrive together on a prefix one earlier request left uncompressed: each
    is cut to observe it; it is compressed once, by the last to finish (before that, the
    others still run on the full copy)."""
    url = lava_server.url
    prefix, suffixes = program_inputs
    alone = []  # each racer's answer on the full cache
    for suffix in suffixes[1:]:
        flush(url)
        alone.append(generate(url, prefix + suffix)["text"])
    flush(url)
    compressions = store_stats(url)["compressions"]
    generate(url, prefix + suffixes[0])
    with concurrent.futures.ThreadPoolExecutor(3) as clients:
        results = list(clients.map(lambda suffix: generate(url, prefix + suffix), suffixes[1:]))
    assert [result["text"] for result in results] == alone
    stats = store_stats(url)
    assert stats["compressions"] == compressions + 1 and stats["entries"] == 1
    flush(url)
    assert store_stats(url)["pool_available"] == MAX_TOTAL_TOKENS


def test_a_document_asked_once_then_committed_is_compressed_for_the_later_questions(lava_server, program_inputs,
                                                                                    prefix_tokens):
    """A document plain requests cached, then committed by a program: the commit recomputes the
    document's last window (its observation), the document is compressed, and the full copy
    and the earlier request's tokens are given back."""
    url = lava_server.url
    prefix, suffixes = program_inputs
    flush(url)
    compressions = store_stats(url)["compressions"]
    generate(url, prefix + suffixes[0])
    commit = requests.post(url + "/generate", timeout=300,
                           json={"text": prefix, "sampling_params": {"max_new_tokens": 0}})
    assert commit.status_code == 200, commit.text
    assert commit.json()["meta_info"]["cached_tokens"] == prefix_tokens - WINDOW
    stats = store_stats(url)
    assert stats["compressions"] == compressions + 1 and stats["entries"] == 1
    assert stats["evictable"] + stats["protected"] == stats["borrowed_slots"]
    later = generate(url, prefix + suffixes[1])
    assert later["meta_info"]["cached_tokens"] >= prefix_tokens - 1  # the compressed copy


def test_a_request_diverging_inside_a_compressed_document_recomputes_it(lava_server, program_inputs):
    """Only part of the compressed prefix matches: the request must not read the compressed
    node; it recomputes the document and answers as on an empty cache."""
    url = lava_server.url
    prefix, suffixes = program_inputs
    diverging = prefix[:len(prefix) // 2] + suffixes[0]
    flush(url)
    on_empty_cache = generate(url, diverging)
    flush(url)
    run_program(url, program_inputs)
    assert store_stats(url)["entries"] == 1
    after_compression = generate(url, diverging)
    assert after_compression["meta_info"]["cached_tokens"] == 0
    assert after_compression["text"] == on_empty_cache["text"]


def test_metrics_report_each_compressed_prefix(lava_server, program_inputs):
    # /server_info counts since the flush; Prometheus counts since the server started (the
    # first run makes sure its samples exist).
    run_program(lava_server.url, program_inputs)
    flush(lava_server.url)
    before = metrics_text(lava_server.url)
    run_program(lava_server.url, program_inputs)
    stats = store_stats(lava_server.url)
    text = metrics_text(lava_server.url)
    for name in ("lava:compress_seconds_count", "lava:compressed_prefix_tokens_count"):
        assert metric(text, name) - metric(before, name) == stats["compressions"] >= 1
    assert metric(text, "lava:store_entries") == stats["entries"] == 1
    assert metric(text, "lava:store_bytes") == stats["bytes_stored"] > 0
    assert metric(text, "lava:bytes_saved_total") >= stats["bytes_saved"] > 0
    assert 0.2 <= metric(text, "lava:kept_ratio_sum") / metric(text, "lava:kept_ratio_count") <= 0.3


def test_flush_gives_back_the_store_and_the_pool(lava_server, program_inputs):
    run_program(lava_server.url, program_inputs)
    assert store_stats(lava_server.url)["entries"] == 1
    flush(lava_server.url)
    stats = store_stats(lava_server.url)
    initial = lava_server.initial_stats
    assert stats["pool_available"] == initial["pool_available"] == MAX_TOTAL_TOKENS
    assert (stats["entries"], stats["stored_rows"], stats["borrowed_slots"]) == (0, 0, 0)
    assert (stats["evictable"], stats["protected"], stats["compressions"], stats["evictions"]) == (0, 0, 0, 0)


def test_chat_completions_share_the_compressed_prefix(lava_server, program_inputs, document, prefix_tokens):
    flush(lava_server.url)
    answers, meta_info = run_program(lava_server.url, program_inputs)
    compressions = store_stats(lava_server.url)["compressions"]
    reply = chat(lava_server.url, document, document.questions[0].text)
    # The same prompt as the program's first branch (the chat template is the program's
    # text), read from the same copy: the answer the e2e fork test compares with the reference.
    assert (reply["prompt_tokens"], reply["answer"]) == (meta_info[0]["prompt_tokens"], answers[0])
    assert reply["cached_tokens"] >= prefix_tokens - 1
    assert store_stats(lava_server.url)["compressions"] == compressions == 1  # read, not compressed again


def chat_messages(document, question: str) -> list[dict]:
    """The benchmark's prompt as OpenAI chat messages: the system prompt, then the document and
    the question in one user turn."""
    from lava_sglang.bench.documents import SYSTEM_PROMPT

    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Document:\n{document.text}\n\nQuestion: {question}"}]


def chat(url: str, document, question: str) -> dict:
    response = requests.post(url + "/v1/chat/completions", timeout=300, json={
        "model": "default", "temperature": 0, "max_tokens": ANSWER_TOKENS,
        "messages": chat_messages(document, question), "return_token_ids": True,
    })
    assert response.status_code == 200, response.text
    body = response.json()
    choice = body["choices"][0]
    return {"answer": choice["message"]["content"],
            "answer_ids": answer_ids(choice["response_token_ids"], choice["matched_stop"]),
            "prompt_tokens": body["usage"]["prompt_tokens"],
            "cached_tokens": body["usage"]["prompt_tokens_details"]["cached_tokens"]}


def chat_ids(tokenizer, document, question: str) -> list[int]:
    """The prompt `chat` sends, as the server's chat template tokenizes it."""
    return tokenizer.apply_chat_template(chat_messages(document, question), add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def test_documents_behind_one_chat_header_are_each_compressed_once(lava_server, tokenizer, smollm2_path):
    """OpenAI traffic over three documents behind one system prompt and chat header
    (`--kv-compress-on shared`): each document is compressed once, by its second question,
    which is itself answered on the full cache; a later question reads the compressed copy,
    and a question not asked before answers as the reference runtime does on the same
    compression (a question asked before reuses its own tokens, computed on the full cache
    before the compression, where the reference would recompute them)."""
    url = lava_server.url
    count = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
    documents = [retrieval_documents(count, 400, [3], seed=seed)[0] for seed in (3, 4, 5)]
    alone = []  # each second question's answer on the full cache
    for document in documents:
        flush(url)
        alone.append(chat(url, document, document.questions[1].text)["answer"])
    flush(url)
    compressions = store_stats(url)["compressions"]
    firsts = [chat(url, document, document.questions[0].text) for document in documents]
    assert firsts[0]["cached_tokens"] == 0 and all(first["cached_tokens"] > 0 for first in firsts[1:])  # the header
    assert store_stats(url)["compressions"] == compressions
    seconds = [chat(url, document, document.questions[1].text) for document in documents]
    stats = store_stats(url)
    assert stats["compressions"] == compressions + 3 and stats["entries"] == 3
    assert [second["answer"] for second in seconds] == alone
    for document in documents:
        later = chat(url, document, document.questions[0].text)
        assert later["cached_tokens"] >= 300  # the compressed header and document
        first_ids, second_ids, new_ids = (chat_ids(tokenizer, document, question.text)
                                          for question in document.questions)
        shared_len = next(i for i, (a, b) in enumerate(zip(first_ids, second_ids)) if a != b)
        new = chat(url, document, document.questions[2].text)
        assert (new["prompt_tokens"], new["cached_tokens"]) == (len(new_ids), shared_len)  # the compressed copy only
        assert new["answer_ids"] == reference_ids_on_a_compressed_prefix(smollm2_path, url, new_ids, shared_len,
                                                                         ANSWER_TOKENS)
    assert store_stats(url)["compressions"] == compressions + 3


def test_a_malformed_request_fails_alone(lava_server, program_inputs):
    flush(lava_server.url)
    prefix, suffixes = program_inputs
    good = {"text": prefix + suffixes[0], "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    bad = [
        {"text": prefix + suffixes[1], "sampling_params": {"max_new_tokens": -5}},
        {"text": prefix + suffixes[2], "sampling_params": {"temperature": "hot"}},
        {"input_ids": [10**9, 5, 6], "sampling_params": {"max_new_tokens": 4}},
        # An image sent to a text-only model: SGLang ignores it and would pass the ids on as given.
        {"input_ids": [5, 10**9 + 1], "image_data": "x", "sampling_params": {"max_new_tokens": 4}},
    ]
    requests_in_order = [good, *bad, good]
    with concurrent.futures.ThreadPoolExecutor(len(requests_in_order)) as pool:
        responses = list(pool.map(
            lambda body: requests.post(lava_server.url + "/generate", json=body, timeout=300), requests_in_order))
    assert [r.status_code for r in responses[1:-1]] == [400] * len(bad), [r.text for r in responses]
    # Each refusal says what was wrong: SGLang's own checks, and the plugin's (stock SGLang lets
    # an id outside the vocabulary reach the model, which kills the scheduler).
    assert "max_new_tokens must be at least 0, got -5" in responses[1].text
    assert "input_ids contains token id 1000000000 outside the vocabulary" in responses[3].text
    assert "input_ids contains token id 1000000001 outside the vocabulary" in responses[4].text
    assert responses[0].status_code == responses[-1].status_code == 200
    assert responses[0].json()["text"] == responses[-1].json()["text"] != ""
    assert requests.get(lava_server.url + "/health_generate", timeout=120).status_code == 200
