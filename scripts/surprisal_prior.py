"""Repetition scores weighted by each token's surprisal: does a query-agnostic prior on
unpredictable tokens keep the planted facts that the repetition alone does not single out?

KVzip's repetition scores a token by the attention a copy of the document pays it; on this
model they keep a planted code's tokens at about the keep ratio (`scripts/fact_coverage.py`).
A code is random digits, which the document's own prefill predicts badly. This script
weights every layer's and query head's repetition attention on token t by
(nll_t / mean nll) ** gamma, nll_t = -log p(x_t | x_<t) under the same model's prefill
(gamma 0: the plain repetition, the default's scores), plans with a policy (the default
`lava`: one global threshold) and answers the benchmark's retrieval questions.

    python scripts/surprisal_prior.py --context 2048 --questions 48 --facts 8 --seed 1 --name facts8_2k_seed1

The documents, questions, answer cap and correctness test are `lava-sglang bench quality`'s;
the surprisal needs the prefill's logits at every position, which the reference runtime has
and the server does not compute (SGLang's extend keeps the last token's). Writes
<out>/<name>.json (the counts) and <out>/<name>.md (the table with 95% Wilson intervals).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lava_sglang.argtypes import keep_ratio, positive_int
from lava_sglang.bench.documents import CODE_PATTERN, prompt_parts
from lava_sglang.bench.quality import QualityConfig, benchmark_documents
from lava_sglang.bench.stats import wilson_interval
from lava_sglang.reference.runtime import Observation, ReferenceRuntime

OUT_DIR = Path(__file__).resolve().parents[1] / "docs" / "results" / "reuse" / "surprisal"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=positive_int, default=2048, help="document tokens (default 2048)")
    parser.add_argument("--questions", type=positive_int, default=80, help="retrieval questions (default 80)")
    parser.add_argument("--facts", type=positive_int, nargs="+", default=[1, 4, 8],
                        help="facts per document, cycled (default 1 4 8, the benchmark's)")
    parser.add_argument("--seed", type=int, default=0, help="document seed (default 0)")
    parser.add_argument("--keep", type=keep_ratio, nargs="+", default=[0.1, 0.2], help="keep ratios")
    parser.add_argument("--gammas", type=float, nargs="+", default=[1.0, 2.0, 3.0],
                        help="surprisal exponents besides 0, the plain repetition (default 1 2 3)")
    parser.add_argument("--policy", default="lava", help="policy or spec (default lava)")
    parser.add_argument("--name", required=True, help="output file stem")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default docs/results/reuse/surprisal)")
    args = parser.parse_args()
    if any(not (math.isfinite(gamma) and gamma > 0) for gamma in args.gammas):
        parser.error("--gammas takes exponents > 0 (0, the plain repetition, is always run)")
    return args


def weighted(observation: Observation, nll: torch.Tensor, gamma: float) -> Observation:
    """The observation with each token's repetition attention times (nll / mean nll) ** gamma."""
    weight = (nll.clamp_min(1e-3) / nll[1:].mean()) ** gamma
    return Observation(observation.source, token_ids=observation.token_ids,
                       repeat_attention=[attention * weight[None, :attention.shape[1]].to(attention)
                                         for attention in observation.repeat_attention])


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    runtime = ReferenceRuntime.load(dtype=torch.float32)
    tokenizer = runtime.tokenizer

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    documents = benchmark_documents("retrieval", args.context, args.questions, lambda text: len(ids(text)),
                                    args.seed, args.facts)
    gammas = [0.0, *args.gammas]
    cells = ["full cache"] + [f"gamma {gamma:g}, keep {keep:g}" for gamma in gammas for keep in args.keep]
    right = dict.fromkeys(cells, 0)
    inputs = (f"{len(documents)} documents of {args.context} tokens, facts {args.facts} cycled, seed {args.seed}, "
              f"{args.questions} retrieval questions; policy {args.policy}, keep {args.keep}, gammas {gammas}; "
              f"repetition scores (reconstruct); SmolLM2-135M-Instruct fp32, {platform.machine()}, "
              f"{torch.get_num_threads()} threads")
    print(f"inputs: {inputs}")
    started = time.time()
    for document in tqdm(documents, desc="documents", unit="document"):
        prefix_ids = ids(prompt_parts(document.text, "")[0])
        capture = runtime.prefill(prefix_ids)
        observation = runtime.observe(capture, "reconstruct")
        nll = runtime.surprisal(prefix_ids)
        prefixes = [runtime.compress(capture, "full", 1.0)]
        for gamma in gammas:
            seen = observation if gamma == 0 else weighted(observation, nll, gamma)
            prefixes += runtime.compress_many(capture, [(args.policy, keep) for keep in args.keep], seen)
        for question in document.questions:
            suffix = ids(prompt_parts(document.text, question.text)[1])
            answers = runtime.generate(prefixes, suffix, QualityConfig.retrieval_answer_tokens,
                                       stop_when=lambda tokens: CODE_PATTERN.search(tokenizer.decode(tokens)) is not None)
            for cell, answer in zip(cells, answers):
                right[cell] += question.answer in tokenizer.decode(answer)
    result = {"inputs": inputs, "args": {**vars(args), "out": str(args.out)}, "questions": args.questions,
              "right": right, "wall_seconds": round(time.time() - started)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Surprisal prior: {args.name}", "", f"inputs: {inputs}", "",
             "| cell | right | of | 95% interval |", "|---|---:|---:|---|"]
    for cell, count in right.items():
        low, high = wilson_interval(count, args.questions)
        lines.append(f"| {cell} | {count} | {args.questions} | [{low:.2f}, {high:.2f}] |")
    lines += ["", f"Written by `scripts/surprisal_prior.py` in {result['wall_seconds']} s."]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
