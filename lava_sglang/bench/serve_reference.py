"""The server against the reference runtime: same documents, questions, policy and ratio.

Every question a `bench serve` run answered is answered again by the reference runtime
(`lava_sglang.reference`: transformers, fp32, no SGLang), reproducing what the server did:

- the document's prefix (the fork program's commit) is prefilled and planned with the
  server's policy as it ran (`policy_spec` in its /server_info: every field, so a default
  changed since does not change the plan) and budget, over all its n tokens;
- a question that found m cached tokens on a compressing server read a compressed prefix
  when m >= n - 1 (SGLang matches at most n - 1 tokens of a prompt, and the plugin stores
  the plan's rows among those; a compressed node is matched whole or not at all): the
  reference keeps the plan's rows among the first n - 1 tokens and decodes the rest of the
  question's prompt after them. A hit past n - 1 read tokens an earlier request computed
  after the compressed rows (a later visit's commit recomputes the prefix's last token),
  which the reference computes the same way; any other question (a miss, or `--kv-policy
  none`) saw the full cache, and so does its reference;
- under `--kv-observe branches` the questions of a visit whose commit prefilled the document
  ran on the full prefix, and the plan later visits read is scored by the tail and by that
  visit's questions as branches (the reference prefills them after the whole prefix, as the
  server did; the visit's first 8, `MAX_BRANCH_WINDOWS`, where the server took at most 8
  windows, of the first branches it matched, which the run does not record: rows observed by
  a visit of more are marked `observers_guessed`, and the report counts them); under
  `--kv-observe reconstruct` likewise, the plan scored by the document's repetition
  (`ReferenceRuntime.observe(..., "reconstruct")`);
- answers are greedy, as long as the server's (`max_tokens`), stopped at EOS.

Per policy it reports the server's and the reference's accuracy and how many answers are
identical, into `<results stem>_reference.{json,md}` next to the results file.

    lava-sglang bench serve-reference docs/results/serving.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from lava_sglang.argtypes import check_results, read_json, replace_file
from lava_sglang.bench.serve_workload import Visit, is_correct, program_inputs
from lava_sglang.bench.stats import wilson_interval

NO_COMPRESSION = "none"


def compressing_visits(record: dict) -> dict[int, int | None]:
    """Under a deferred `--kv-observe` (branches, reconstruct): for each visit, the visit
    whose commit made the compressed copy it read (the document's latest visit, itself
    included, whose commit found the document missing and so prefilled, deferred and
    compressed it; under branches, its questions observed it); None when the visit's own
    commit missed, i.e. its branches ran on the full prefix."""
    last_miss, result = {}, {}
    for visit in sorted(record.get("visit_records", []), key=lambda visit: visit["visit"]):
        # Exact, unlike the report's miss rule (`serve_workload.is_miss`, which forgives stock
        # SGLang a few uncached tokens): a commit reads the compressed copy only where it finds
        # all of it, the prefix but its last token, which stays with the branches.
        missed = (visit.get("commit_cached_tokens") or 0) < visit["prefix_tokens"] - 1
        if missed:
            last_miss[visit["document"]] = visit["visit"]
        result[visit["visit"]] = None if missed else last_miss.get(visit["document"])
    return result


def observing_questions(record: dict, observer: int | None) -> tuple[list[dict], bool]:
    """Under `--kv-observe branches`, the questions of visit `observer` (None: none) taken as the
    branches that observed its compressed copy, and whether that is a guess. The server adds
    at most MAX_BRANCH_WINDOWS windows, of the first branches it matches (`claim_branch`),
    which the run does not record; the reference takes the visit's first as many, the same
    set unless the visit had more."""
    from lava_sglang.sglang_plugin.config import MAX_BRANCH_WINDOWS

    questions = [question for question in record["question_records"] if question["visit"] == observer]
    return questions[:MAX_BRANCH_WINDOWS], len(questions) > MAX_BRANCH_WINDOWS


def reference_answers(runtime, documents, record: dict, max_tokens: int, progress: bool = True) -> list[dict]:
    """The reference's answer to each of `record`'s questions (one policy's run)."""
    from tqdm import tqdm

    from lava_sglang.policy import POLICIES, policy_name
    from lava_sglang.reference import CompressedPrefix
    from lava_sglang.sglang_plugin.config import BRANCHES, CHAT, DEFERRED_OBSERVE_SOURCES, FORK

    options = record.get("kv_policy_options") or {}
    policy = options_spec(record) if record["policy"] != NO_COMPRESSION else None
    observe = options.get("observe")
    fork_commits = FORK in (options.get("compress_on") or [FORK])
    # The server defers only for policies that read attention (streamingllm compresses at commit).
    deferred = (observe in DEFERRED_OBSERVE_SOURCES and policy is not None
                and POLICIES[policy_name(policy)].needs_scores)
    observed_by = compressing_visits(record) if deferred else {}
    observers_of = ({visit: observing_questions(record, visit) for visit in set(observed_by.values()) - {None}}
                    if observe == BRANCHES else {})
    captures, prefixes, kept_rows, rows = {}, {}, {}, []
    tokenizer = runtime.tokenizer

    def prompt_of(question: dict) -> list[int]:
        """The question's prompt tokens (its document prefilled once, on first use)."""
        document = documents[question["document"]]
        visit = Visit(0, question["document"], (question["question"],), 0)
        prefix_text, (suffix_text,) = program_inputs(document, visit)
        if question["document"] not in captures:
            captures[question["document"]] = runtime.prefill(tokenizer(prefix_text).input_ids)
        return tokenizer(prefix_text + suffix_text).input_ids

    for question in tqdm(record["question_records"], desc=f"reference {record['policy']}", disable=not progress):
        prompt_ids = prompt_of(question)
        capture = captures[question["document"]]
        prefix_len = capture.seq_len
        cached = question.get("cached_tokens") or 0
        # A prefix below --kv-min-prefix is never compressed: a full hit on it is the ordinary copy.
        compressed = policy is not None and cached >= prefix_len - 1 and prefix_len >= options.get("min_prefix", 0)
        observer = None
        if compressed and deferred:
            observer = observed_by.get(question["visit"])
            compressed = observer is not None
        if not compressed:
            keep_len = prefix_len
        elif fork_commits:
            # A fork commit's compressed node holds the first n - 1 tokens: a token cached after
            # it was computed over the compressed rows, as the reference computes the rest.
            keep_len = prefix_len - 1
        else:
            # Under --kv-compress-on shared alone, the prefix a hit shares is compressed with
            # what was cached below it, computed over the full prefix.
            keep_len = min(cached, prefix_len)
        while keep_len and prompt_ids[:keep_len] != capture.token_ids[:keep_len]:
            keep_len -= 1  # the question's tokenization differs inside the prefix (never seen so far)
        observers, observers_guessed = observers_of.get(observer, ([], False))
        key = (question["document"], keep_len, compressed, observer)
        if key not in prefixes:
            if compressed:
                observation = None
                if observer is not None and observe == BRANCHES:  # the branches of the visit that compressed it
                    branches = [prompt_of(other)[prefix_len:] for other in observers]
                    observation = runtime.observe(capture, observe, branches=branches)
                elif observer is not None:  # the repetition, chunked and normalised as the server's
                    prompt = options.get("observe_prompt")
                    observation = runtime.observe(capture, observe, chunk_tokens=options.get("observe_chunk"),
                                                  normalize=options.get("observe_normalize"),
                                                  view=options.get("observe_view"),
                                                  chat_turn=None if prompt is None else prompt == CHAT)
                plan = runtime.compress(capture, policy, options["budget"], observation=observation,
                                        window=options["window"], pool_kernel=options["pool_kernel"],
                                        alpha=options["alpha"]).plan
            else:
                plan = runtime.full_prefix(capture).plan
            cut = dataclasses.replace(plan, seq_len=keep_len,
                                      kept=[[positions[positions < keep_len] for positions in heads]
                                            for heads in plan.kept])
            prefixes[key] = CompressedPrefix.from_plan(capture, cut)
            kept_rows[key] = sum(len(positions) for heads in cut.kept for positions in heads)
        answer_ids = runtime.generate([prefixes[key]], prompt_ids[keep_len:], max_tokens)[0]
        answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
        rows.append({"document": question["document"], "question": question["question"],
                     "compressed": compressed, "keep_len": keep_len, "observed_by_visit": observer,
                     "kept_rows": kept_rows[key],  # every layer and KV head: /server_info's stored_rows
                     "observers_guessed": observers_guessed,
                     "prompt_tokens_match": len(prompt_ids) == question.get("prompt_tokens"),
                     "server_answer": question["answer"], "reference_answer": answer,
                     "expected": question["expected"], "server_correct": question["correct"],
                     "reference_correct": is_correct(answer, question["expected"]),
                     "identical": answer == question["answer"]})
    return rows


def summary(policy: str, rows: list[dict]) -> dict:
    graded = [row for row in rows if row["expected"] is not None]

    def accuracy(key: str) -> tuple[float, list[float]]:
        correct = sum(bool(row[key]) for row in graded)
        return correct / len(graded) if graded else math.nan, list(wilson_interval(correct, len(graded)))

    server, server_ci = accuracy("server_correct")
    reference, reference_ci = accuracy("reference_correct")
    return {"policy": policy, "questions": len(rows), "compressed": sum(row["compressed"] for row in rows),
            "server_accuracy": server, "server_ci95": server_ci,
            "reference_accuracy": reference, "reference_ci95": reference_ci,
            "identical_answers": sum(row["identical"] for row in rows),
            "same_correctness": sum(row["server_correct"] == row["reference_correct"] for row in graded),
            "prompt_tokens_mismatches": sum(not row["prompt_tokens_match"] for row in rows),
            "observers_guessed": sum(row["observers_guessed"] for row in rows)}


def server_dtypes(meta: dict) -> dict[str, str]:
    """Each server's `--dtype` as `bench serve` started it ("auto": the checkpoint's own;
    "unknown" for a `--url` server, whose flags the run does not see)."""
    dtypes = {}
    for policy, server in meta.get("servers", {}).items():
        args = server.get("args")
        dtypes[policy] = "unknown" if args is None else last_flag_value(args, "--dtype") or "auto"
    return dtypes


def last_flag_value(args: list[str], flag: str) -> str | None:
    """The value SGLang's parser takes for `flag` from `args`, given in full (`--flag V` or
    `--flag=V`; not an abbreviation): the last one given, as a user's --server-args follow the
    flags `bench serve` sets."""
    value = None
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(flag + "="):
            value = arg.partition("=")[2]
    return value


def markdown(results_path: Path, summaries: list[dict], rows: dict[str, list[dict]],
             dtypes: dict[str, str] | None = None) -> str:
    lines = [f"# Serving vs the reference runtime ({results_path.name})", "",
             f"Generated by `lava-sglang bench serve-reference {results_path}`: every question of the "
             "serving run answered again by the reference runtime (transformers, fp32) with the same "
             "document, policy options and cached length (module docstring of "
             "`lava_sglang.bench.serve_reference`). Accuracy with its 95% Wilson interval.", "",
             "| policy | questions | read a compressed prefix | server accuracy | reference accuracy "
             "| identical answers | same correctness |", "|---|---|---|---|---|---|---|"]
    for item in summaries:
        lines.append(
            f"| {item['policy']} | {item['questions']} | {item['compressed']} "
            f"| {item['server_accuracy']:.2f} [{item['server_ci95'][0]:.2f}, {item['server_ci95'][1]:.2f}] "
            f"| {item['reference_accuracy']:.2f} [{item['reference_ci95'][0]:.2f}, {item['reference_ci95'][1]:.2f}] "
            f"| {item['identical_answers']} / {item['questions']} | {item['same_correctness']} / {item['questions']} |")
    guessed = {item["policy"]: item["observers_guessed"] for item in summaries if item["observers_guessed"]}
    if guessed:
        from lava_sglang.sglang_plugin.config import MAX_BRANCH_WINDOWS

        lines += ["", "Questions whose compressed prefix was observed by a visit of more than "
                  f"{MAX_BRANCH_WINDOWS} questions (`--kv-observe branches`): the server observed it with at most "
                  f"{MAX_BRANCH_WINDOWS} of the branches it matched, the reference with the visit's first "
                  f"{MAX_BRANCH_WINDOWS}; "
                  "they may differ: " + ", ".join(f"{policy} {count}" for policy, count in guessed.items()) + "."]
    mismatched = {item["policy"]: item["prompt_tokens_mismatches"] for item in summaries
                  if item["prompt_tokens_mismatches"]}
    if mismatched:  # documents rebuilt from another Python's pydoc_data, or another tokenizer
        lines += ["", "**Questions whose prompt the reference tokenized to another length than the server "
                  "reported** (not the same prompt: their comparison does not hold): "
                  + ", ".join(f"{policy} {count}" for policy, count in mismatched.items()) + "."]
    not_fp32 = {policy: dtype for policy, dtype in (dtypes or {}).items() if dtype != "float32"}
    if not_fp32:  # bench serve on a GPU leaves the checkpoint's dtype (bf16 for SmolLM2)
        lines += ["", "**Servers not run in fp32** (" + ", ".join(f"{policy} {dtype}" for policy, dtype
                                                               in not_fp32.items())
                  + "): the reference runs in fp32, so answers may differ by precision alone."]
    lines += ["", "## Answers that differ", ""]
    for policy, policy_rows in rows.items():
        for row in policy_rows:
            if not row["identical"]:
                lines.append(f"- {policy}, document {row['document']}, question {row['question']} "
                             f"(expected {row['expected']}): server {row['server_answer']!r}; "
                             f"reference {row['reference_answer']!r}")
    return "\n".join(lines) + "\n"


def recorded_model(meta: dict) -> tuple[str | None, bool]:
    """The checkpoint a serving run's servers ran, and whether it is known: `--model` (None:
    the default SmolLM2) for the servers `bench serve` started; for a `--url` run, the
    `model_path` the server reported (unknown in a file that lacks it)."""
    if not meta["config"].get("url"):
        return meta["config"].get("model"), True
    paths = {server.get("model_path") for server in meta.get("servers", {}).values()} - {None}
    return (paths.pop(), True) if len(paths) == 1 else (None, False)


def run_model(recorded: str | None, given: str | None, results_path: Path, known: bool = True) -> str | None:
    """The checkpoint to answer with: the serving run's own (None: the default SmolLM2);
    another is refused, since its tokenizer would build other documents and its answers
    would be compared with another model's. Where the run's checkpoint is not `known`, the
    given one is taken on trust."""
    if given is None:
        if not known:
            raise ValueError(f"{results_path} does not say which checkpoint its server ran; give it with --model")
        return recorded
    if not known:
        return given
    from lava_sglang.model import smollm2_location

    if Path(given).resolve() == Path(recorded if recorded is not None else smollm2_location()).resolve():
        return recorded
    raise ValueError(f"--model {given}: {results_path} was served by {recorded or 'the default SmolLM2'}; "
                     "the reference must run the same checkpoint (leave --model out to use it)")


def options_spec(record: dict) -> str:
    """The policy a compressing run's server ran, every field spelled out (`policy_spec` in its
    /server_info): the policy's name alone would mean today's defaults, which may not be the
    run's (lava's allocation changed on 2026-12-01)."""
    spec = (record.get("kv_policy_options") or {}).get("policy_spec")
    if spec is None:
        raise ValueError(f"the {record['policy']} run did not record its policy's options (policy_spec; runs "
                         "before 2026-12-05): its policy may not be today's default; run `lava-sglang bench serve` "
                         "again")
    return spec


def run(results_path: Path, model: str | None = None, progress: bool = True) -> list[Path]:
    from lava_sglang.bench.serve import ServeConfig, make_documents
    from lava_sglang.reference import ReferenceRuntime

    if not results_path.is_file():
        raise ValueError(f"no results file {results_path} (a `lava-sglang bench serve` run's .json)")
    result = check_results(read_json(results_path), str(results_path), "bench serve", ("config",))
    config_fields = {f.name for f in dataclasses.fields(ServeConfig)}
    config = ServeConfig(**{k: v for k, v in result["meta"]["config"].items() if k in config_fields})
    recorded, known = recorded_model(result["meta"])
    model = run_model(recorded, model, results_path, known)
    for record in result["records"]:  # before the model loads
        if record["policy"] != NO_COMPRESSION:
            options_spec(record)
    windows = {(record.get("kv_policy_options") or {}).get("window") for record in result["records"]} - {None}
    if len(windows) > 1:
        raise ValueError(f"{results_path}: the servers used different windows {sorted(windows)}; check one at a time")
    runtime = ReferenceRuntime.load(model, window=windows.pop() if windows else 32)
    documents = make_documents(runtime.tokenizer, config)
    rows, summaries = {}, []
    for record in result["records"]:
        rows[record["policy"]] = reference_answers(runtime, documents, record, config.max_tokens, progress)
        summaries.append(summary(record["policy"], rows[record["policy"]]))
        print(json.dumps(summaries[-1]))
    stem = results_path.with_suffix("")
    json_path, md_path = Path(f"{stem}_reference.json"), Path(f"{stem}_reference.md")
    replace_file(json_path, json.dumps({"results": str(results_path), "summaries": summaries, "answers": rows},
                                       indent=1) + "\n")
    replace_file(md_path, markdown(results_path, summaries, rows, server_dtypes(result["meta"])))
    return [json_path, md_path]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", type=Path, help="a `lava-sglang bench serve` results file (serving.json)")
    parser.add_argument("--model", help="checkpoint folder; only the serving run's own is accepted (default: the "
                        "run's: the converted SmolLM2 unless it was started with --model, or for a --url run the "
                        "checkpoint its server reported)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
