"""Helpers shared by the end-to-end server tests: fork programs and the plugin's server info."""

from __future__ import annotations

import concurrent.futures
import re
from collections.abc import Iterable

import requests
import sglang as sgl

from lava_sglang.bench.documents import Document, prompt_parts, retrieval_documents
from lava_sglang.frontend import multi_question_qa


def planted_documents(tokenizer, tokens: int, seeds: Iterable[int]) -> list[Document]:
    """One retrieval document of about `tokens` tokens with 4 planted facts per seed."""
    count = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
    return [retrieval_documents(count, tokens, [4], seed=seed)[0] for seed in seeds]


def prefix_tokens(tokenizer, document: Document) -> int:
    """Tokens in the fork program's shared prefix on `document`."""
    return len(tokenizer(prompt_parts(document.text, "")[0]).input_ids)


def program_texts(document: Document, questions: Iterable[int]) -> tuple[str, list[str]]:
    """The multi-question program's shared prefix on `document` and each question's suffix."""
    prefix, _ = prompt_parts(document.text, "")
    return prefix, [prompt_parts("", document.questions[q].text)[1] for q in questions]


def ask(url: str, document: Document, questions: Iterable[int], max_tokens: int) -> tuple[list[str], list[dict]]:
    """Run the multi-question fork program on `document` with the given questions (indices):
    the answers and each branch's meta info."""
    prefix, suffixes = program_texts(document, questions)
    state = multi_question_qa.run(prefix=prefix, suffixes=suffixes, max_tokens=max_tokens,
                                  backend=sgl.RuntimeEndpoint(url))
    return state["answers"], state["meta_info"]


def ask_over_http(url: str, document: Document, questions: Iterable[int], max_tokens: int) -> list[dict]:
    """What the multi-question fork program sends, as plain /generate requests: the shared
    prefix alone (no new tokens), then one request per question, all at once; each branch's
    meta info. For SGLang's router with --dp-aware, which cannot answer /get_model_info (it
    asks `server@rank`), so `sgl.RuntimeEndpoint` cannot connect through it."""
    prefix, suffixes = program_texts(document, questions)
    commit = requests.post(url + "/generate", json={"text": prefix, "sampling_params": {"max_new_tokens": 0}},
                           timeout=600)
    commit.raise_for_status()

    def branch(suffix: str) -> dict:
        response = requests.post(url + "/generate", timeout=600, json={
            "text": prefix + suffix, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0}})
        response.raise_for_status()
        return response.json()["meta_info"]

    with concurrent.futures.ThreadPoolExecutor(len(suffixes)) as branches:
        return list(branches.map(branch, suffixes))


def run_record(policy: str, options: dict, prefix_len: int, visits) -> dict:
    """A server run on one document as `reference_answers` reads it: `options` the server's
    /server_info policy options; `visits` per visit (questions, answers, meta infos), the
    first visit committing the document, the later ones finding it cached."""
    keys = ("policy_spec", "budget", "window", "pool_kernel", "alpha", "observe", "observe_chunk", "observe_normalize",
            "observe_view", "observe_prompt")
    return {"policy": policy, "kv_policy_options": {key: options[key] for key in keys},
            "visit_records": [{"visit": visit, "document": 0, "prefix_tokens": prefix_len,
                               "commit_cached_tokens": 0 if visit == 0 else prefix_len - 1}
                              for visit in range(len(visits))],
            "question_records": [{"visit": visit, "document": 0, "question": question, "answer": answer,
                                  "expected": None, "correct": None, "cached_tokens": meta["cached_tokens"],
                                  "prompt_tokens": meta["prompt_tokens"]}
                                 for visit, (questions, answers, metas) in enumerate(visits)
                                 for question, answer, meta in zip(questions, answers, metas)]}


def metrics_text(url: str) -> str:
    """The server's Prometheus page (`--enable-metrics`)."""
    return requests.get(url + "/metrics", timeout=60).text


def metric(text: str, name: str) -> float:
    """The one sample of `name` on a Prometheus page."""
    values = [float(value) for value in re.findall(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.MULTILINE)]
    assert len(values) == 1, f"{name} not exactly once in /metrics"
    return values[0]


def kv_state(url: str) -> dict:
    """/server_info's `lava_kv_policy`: the plugin's options and its store and pool counters."""
    return requests.get(url + "/server_info", timeout=60).json()["internal_states"][0]["lava_kv_policy"]


def store_stats(url: str) -> dict:
    return kv_state(url)["store"]


def reference_ids_on_a_compressed_prefix(model_path, server_url: str, prompt_ids: list[int], compressed_len: int,
                                         max_tokens: int) -> list[int]:
    """The reference runtime's answer token ids (fp32, greedy, stopped before EOS) to
    `prompt_ids` read through the server's compression of its first `compressed_len` tokens:
    the server's policy options, the prefix scored by its own last window (how
    `--kv-compress-on shared` and `--kv-observe tail` score one), the rest of the prompt
    recomputed after the kept rows."""
    from lava_sglang.reference import ReferenceRuntime

    policy = kv_state(server_url)
    runtime = ReferenceRuntime.load(model_path, window=policy["window"])
    capture = runtime.prefill(prompt_ids[:compressed_len])
    compressed = runtime.compress(capture, policy["policy"], policy["budget"], window=policy["window"],
                                  pool_kernel=policy["pool_kernel"], alpha=policy["alpha"])
    return runtime.generate([compressed], prompt_ids[compressed_len:], max_tokens)[0]


def answer_ids(output_ids: list[int], matched_stop) -> list[int]:
    """A server answer's token ids as the reference runtime gives them: SGLang returns the
    stop token that ended the answer (`matched_stop`), the reference runtime stops before it."""
    if isinstance(matched_stop, int) and output_ids and output_ids[-1] == matched_stop:
        return output_ids[:-1]
    return output_ids


def generated_ids(body: dict) -> list[int]:
    """`answer_ids` of a `/generate` response's body."""
    return answer_ids(body["output_ids"], body["meta_info"]["finish_reason"].get("matched"))
