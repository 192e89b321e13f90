"""The retrieval benchmark's answers from repetition scores changed before the plan: the
harness of the scripts that try a change to the default's scores and measure it
(`scripts/surprisal_prior.py`, `scripts/head_selection.py`, `scripts/score_weighting.py`;
docs/allocation.md).

Each document is prefilled and scored by its repetition once (the reference runtime, fp32);
every variant turns that observation into another one for each keep ratio, the policy plans
from it, and the benchmark's questions are answered from every plan and from the full cache.
The documents, questions, answer cap and correctness test are `lava-sglang bench quality`'s.
Beside the answers, how the plans spread the budget: the share of (layer, KV head) rows that
keep more than half the prefix, and the share of all kept rows those hold (means over the
documents), and how the wrong answers are wrong (`answer_kind`). Writes <out>/<name>.json (the
counts and shares) and <out>/<name>.md (the table, with 95% Wilson intervals).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from lava_sglang.argtypes import (at_least, fact_count, file_stem, keep_ratio, output_folder, positive_int,
                                  replace_file)
from lava_sglang.bench.documents import CODE_DIGITS, code_finished, names_code, prompt_parts
from lava_sglang.bench.quality import QualityConfig, benchmark_documents
from lava_sglang.bench.stats import wilson_interval
from lava_sglang.policy import make_policy
from lava_sglang.reference.runtime import Observation, PrefixCapture, ReferenceRuntime

#: observation, keep ratio -> the observation the policy plans from.
Transform = Callable[[Observation, float], Observation]
#: The runtime and a document's prefill (its token ids, keys and values) -> the variants by
#: name, in table order (made per document, so that a variant can measure the document once).
Variants = Callable[[ReferenceRuntime, PrefixCapture], dict[str, Transform]]


def policy_spec(text: str) -> str:
    """A --policy value the registry makes (refused at parse time, before the model loads)."""
    try:
        make_policy(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_arguments(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """The flags every transform script takes: which documents, questions, keep ratios and
    policy, and where the results go."""
    parser.add_argument("--context", type=positive_int, default=2048, help="document tokens (default 2048)")
    parser.add_argument("--questions", type=positive_int, default=80, help="retrieval questions (default 80)")
    parser.add_argument("--facts", type=fact_count, nargs="+", default=[1, 4, 8],
                        help="facts per document, cycled (default 1 4 8, the benchmark's)")
    parser.add_argument("--seed", type=at_least(0), default=0, help="document seed (default 0)")
    parser.add_argument("--keep", type=keep_ratio, nargs="+", default=[0.1, 0.2], help="keep ratios (default 0.1 0.2)")
    parser.add_argument("--policy", type=policy_spec, default="lava", help="policy or spec (default lava)")
    parser.add_argument("--name", type=file_stem, required=True, help="output file stem")
    parser.add_argument("--out", type=Path, default=default_out, help=f"output folder (default {default_out})")


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser`'s arguments (those of `add_arguments` among them), refusing in argparse's one line,
    before the model loads, a policy that reads no scores (`streamingllm`: every variant, which
    transforms the scores, would plan alike), a repeated keep ratio (two cells of one name would
    count each answer twice) and an --out that cannot be made (the results are written at the
    end of the run)."""
    args = parser.parse_args(argv)
    if not make_policy(args.policy).needs_scores:
        parser.error(f"--policy {args.policy} reads no scores, so every variant would plan alike; give a policy "
                     "that scores tokens")
    if len({f"{keep:g}" for keep in args.keep}) != len(args.keep):  # as the cells are named
        parser.error(f"--keep: a value repeats ({' '.join(f'{keep:g}' for keep in args.keep)} as the cells "
                     "name them)")
    try:
        output_folder(args.out)
    except ValueError as error:
        parser.error(str(error))
    return args


#: How a retrieval answer is wrong, in table order (`answer_kind`).
WRONG_KINDS = ("another planted code", "another code", "fewer digits", "no digits")


def answer_kind(text: str, answer: str, planted: set[str]) -> str:
    """"right" if `text` holds the question's code; else, tested in this order, whether it
    holds another of the document's `planted` codes (the wrong fact), another run of
    CODE_DIGITS digits or more (a code the document does not hold: garbled or made up), some
    digits but no such run (a shorter number, a list's "1."), or no digit at all. A code is
    named as a whole number (`names_code`)."""
    if names_code(text, answer):
        return "right"
    if any(names_code(text, code) for code in planted):
        return "another planted code"
    if re.search(rf"\d{{{CODE_DIGITS},}}", text):
        return "another code"
    return "fewer digits" if re.search(r"\d", text) else "no digits"


def broad_share(lengths: torch.Tensor, prefix_len: int) -> tuple[float, float]:
    """Of a plan's kept rows per (layer, KV head) `lengths` [L, Hkv]: the share of the rows
    that keep more than half of `prefix_len` tokens, and the share of all kept rows they hold."""
    lengths = lengths.double()
    broad = lengths > prefix_len / 2
    return broad.double().mean().item(), (lengths[broad].sum() / lengths.sum()).item()


def run(args: argparse.Namespace, script: str, title: str, variant_names: list[str], variants: Variants,
        runtime: ReferenceRuntime | None = None) -> dict:
    """Answer the questions of `args`' documents from the full cache and from every variant's
    plan at every keep ratio; write and print the table (written by `script`). `variant_names`
    are the names `variants` returns, for the inputs line before the first document. The
    runtime is SmolLM2 in fp32 unless one is given."""
    if len(set(variant_names)) != len(variant_names):  # two cells of one name would count each answer twice
        raise ValueError(f"variant names: a value repeats ({variant_names})")
    torch.manual_seed(0)
    runtime = runtime or ReferenceRuntime.load(dtype=torch.float32)
    tokenizer = runtime.tokenizer

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    documents = benchmark_documents("retrieval", args.context, args.questions, lambda text: len(ids(text)),
                                    args.seed, args.facts)
    cells = ["full cache"] + [f"{name}, keep {keep:g}" for name in variant_names for keep in args.keep]
    right = dict.fromkeys(cells, 0)
    wrong = {cell: dict.fromkeys(WRONG_KINDS, 0) for cell in cells}
    broad_heads = dict.fromkeys(cells, 0.0)
    broad_rows = dict.fromkeys(cells, 0.0)
    inputs = (f"{len(documents)} documents of {args.context} tokens, facts {args.facts} cycled, seed {args.seed}, "
              f"{args.questions} retrieval questions; policy {args.policy}, keep {args.keep}, variants "
              f"{variant_names}; repetition scores (reconstruct); SmolLM2-135M-Instruct fp32, {platform.machine()}, "
              f"{torch.get_num_threads()} threads")
    print(f"inputs: {inputs}")
    started = time.time()
    for document in tqdm(documents, desc="documents", unit="document"):
        prefix_ids = ids(prompt_parts(document.text, "")[0])
        capture = runtime.prefill(prefix_ids)
        observation = runtime.observe(capture, "reconstruct")
        transforms = variants(runtime, capture)
        if list(transforms) != variant_names:
            raise ValueError(f"variants {list(transforms)} are not the announced {variant_names}")
        prefixes = [runtime.compress(capture, "full", 1.0)]
        for transform in transforms.values():
            for keep in args.keep:
                prefixes.append(runtime.compress(capture, args.policy, keep, transform(observation, keep)))
        for cell, prefix in zip(cells, prefixes):
            heads, rows = broad_share(prefix.lengths, len(prefix_ids))
            broad_heads[cell] += heads / len(documents)
            broad_rows[cell] += rows / len(documents)
        planted = {question.answer for question in document.questions}  # a question per fact
        for question in document.questions:
            suffix = ids(prompt_parts(document.text, question.text)[1])
            answers = runtime.generate(prefixes, suffix, QualityConfig.retrieval_answer_tokens,
                                       stop_when=code_finished(tokenizer.decode))
            for cell, answer in zip(cells, answers):
                kind = answer_kind(tokenizer.decode(answer), question.answer, planted)
                if kind == "right":
                    right[cell] += 1
                else:
                    wrong[cell][kind] += 1
    result = {"inputs": inputs, "args": {**vars(args), "out": str(args.out)}, "questions": args.questions,
              "right": right, "wrong": wrong, "broad_heads": broad_heads, "broad_rows": broad_rows,
              "wall_seconds": round(time.time() - started)}
    args.out.mkdir(parents=True, exist_ok=True)
    replace_file(args.out / f"{args.name}.json", json.dumps(result, indent=1) + "\n")
    lines = [f"# {title}: {args.name}", "", f"inputs: {inputs}", "",
             "| cell | right | of | 95% interval | wrong: " + " / ".join(WRONG_KINDS)
             + " | rows keeping > half the prefix | their share of kept rows |",
             "|---|---:|---:|---|---|---:|---:|"]
    for cell, count in right.items():
        low, high = wilson_interval(count, args.questions)
        kinds = " / ".join(str(wrong[cell][kind]) for kind in WRONG_KINDS)
        lines.append(f"| {cell} | {count} | {args.questions} | [{low:.2f}, {high:.2f}] | {kinds} | "
                     f"{broad_heads[cell]:.1%} | {broad_rows[cell]:.1%} |")
    lines += ["", f"Written by `{script}` in {result['wall_seconds']} s."]
    replace_file(args.out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result
