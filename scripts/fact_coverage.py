"""Which planted facts a compressed document still holds: for each fact of the quality
benchmark's retrieval documents, the share of (layer, KV head) rows that keep its code's
tokens and its key's, next to whether the compressed cache answers its question.

    python scripts/fact_coverage.py --context 2048 --questions 48 --facts 8 --seed 1 --keep 0.2

The documents, the repetition (`--kv-observe reconstruct`) and the policies are the
benchmark's (`lava-sglang bench quality ... --observe reconstruct`); a fact's code is
"kept" in a (layer, KV head) when every one of its tokens is.
"""

from __future__ import annotations

import argparse
import re
import statistics

from tqdm import tqdm

from lava_sglang.argtypes import at_least, fact_count, keep_ratio, positive_int
from lava_sglang.bench.documents import FACT_TEMPLATE, code_finished, names_code, prompt_parts
from lava_sglang.bench.quality import QualityConfig, benchmark_documents
from lava_sglang.bench.score_transforms import policy_spec
from lava_sglang.reference.runtime import ReferenceRuntime


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=at_least(64), default=2048, help="document tokens, at least 64 (2 windows)")
    parser.add_argument("--questions", type=positive_int, default=48, help="questions (one per fact)")
    parser.add_argument("--facts", type=fact_count, default=8, help="facts per document")
    parser.add_argument("--seed", type=at_least(0), default=1,
                        help="document seed (default 1: the second set of the 2K memory-bound runs, "
                        "docs/results/serving_memory_bound_2k_notes.md)")
    parser.add_argument("--keep", type=keep_ratio, default=0.2, help="keep ratio")
    parser.add_argument("--policies", type=policy_spec, nargs="+", default=["lava", "kvzip"],
                        help="policies or specs whose plans are read (default lava kvzip)")
    return parser.parse_args()


def token_span(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Token indices whose characters overlap [start, end)."""
    return [index for index, (left, right) in enumerate(offsets) if left < end and right > start]


def kept_shares(plan, positions: list[int]) -> tuple[float, float]:
    """Over the (layer, KV head) rows: the share that keep every one of `positions`, and the
    mean share of `positions` a row keeps (the keep ratio where the scores ignore them)."""
    rows = [set(kept.tolist()) for layer in plan.kept for kept in layer]
    whole = sum(all(position in row for position in positions) for row in rows) / len(rows)
    tokens = statistics.mean(sum(position in row for position in positions) / len(positions) for row in rows)
    return whole, tokens


def main() -> None:
    args = parse_args()
    runtime = ReferenceRuntime.load()
    tokenizer = runtime.tokenizer

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    documents = benchmark_documents("retrieval", args.context, args.questions, count_tokens, args.seed,
                                    [args.facts])
    print(f"inputs: {len(documents)} documents of {args.context} tokens, {args.facts} facts each, seed {args.seed}, "
          f"keep {args.keep}, policies {args.policies}, repetition scores (reconstruct)")
    rows = []
    for document in tqdm(documents, desc="documents"):
        prefix_text, _ = prompt_parts(document.text, "")
        encoded = tokenizer(prefix_text, add_special_tokens=False, return_offsets_mapping=True)
        capture = runtime.prefill(encoded["input_ids"])
        observation = runtime.observe(capture, "reconstruct")
        prefixes = runtime.compress_many(capture, [(policy, args.keep) for policy in args.policies], observation)
        full = runtime.compress(capture, "full", 1.0)
        for question in document.questions:
            key = re.search(r"special code for (.+)\?", question.text).group(1)
            fact = FACT_TEMPLATE.format(key=key, code=question.answer)
            fact_start = prefix_text.index(fact)
            code_start, key_start = fact_start + fact.index(question.answer), fact_start + fact.index(key)
            code_tokens = token_span(encoded["offset_mapping"], code_start, code_start + len(question.answer))
            key_tokens = token_span(encoded["offset_mapping"], key_start, key_start + len(key))
            suffix = tokenizer(prompt_parts(document.text, question.text)[1], add_special_tokens=False)["input_ids"]
            # As the benchmark answers: its token cap, stopped once it names a 7-digit number.
            answers = runtime.generate([full, *prefixes], suffix, QualityConfig.retrieval_answer_tokens,
                                       stop_when=code_finished(tokenizer.decode))
            right = [names_code(tokenizer.decode(answer), question.answer) for answer in answers]
            rows.append((right[0], [(right[1 + index], *kept_shares(prefix.plan, code_tokens),
                                     kept_shares(prefix.plan, key_tokens)[0])
                                    for index, prefix in enumerate(prefixes)]))
    print()
    print("| policy | facts | right (full cache) | right | rows keeping the whole code | code tokens kept | "
          "rows keeping the whole key | whole code, questions right | whole code, questions wrong |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for index, policy in enumerate(args.policies):
        cells = [(full_right, *row[index]) for full_right, row in rows]
        right_codes = [whole for _, right, whole, _, _ in cells if right]
        wrong_codes = [whole for _, right, whole, _, _ in cells if not right]
        print(f"| {policy} | {len(cells)} | {sum(c[0] for c in cells)} | {sum(c[1] for c in cells)} | "
              f"{statistics.mean(c[2] for c in cells):.3f} | {statistics.mean(c[3] for c in cells):.3f} | "
              f"{statistics.mean(c[4] for c in cells):.3f} | "
              f"{statistics.mean(right_codes) if right_codes else float('nan'):.3f} | "
              f"{statistics.mean(wrong_codes) if wrong_codes else float('nan'):.3f} |")
    print()
    print("Rows: the model's (layer, KV head) pairs; 'whole': a row keeps every token of the fact's code (or key); "
          "code tokens kept: the mean share of the code's tokens a row keeps (the keep ratio, were codes scored "
          "like any token).")


if __name__ == "__main__":
    main()
