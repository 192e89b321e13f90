"""NVIDIA kvpress's KVzipPress (the KVzip authors' recipe) on this project's retrieval
benchmark: the same documents, questions and prompt token ids as `lava-sglang bench quality`
(seed 0), greedy answers, correct = the planted code appears in the answer.

Run through scripts/kvpress_head_to_head.sh, which puts kvpress and the transformers release
it supports in front of the project's environment. Writes the JSON file --out names (per-question verdicts)
and prints a table; `docs/kvzip.md` records what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

from lava_sglang.argtypes import keep_ratio, positive_int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=positive_int, default=2048,
                        help="document length in tokens (default 2048)")
    parser.add_argument("--questions", type=positive_int, default=80, help="retrieval questions (default 80)")
    parser.add_argument("--keep", type=keep_ratio, nargs="+", default=[0.2, 0.1],
                        help="keep ratios in (0, 1] (default 0.2 0.1)")
    parser.add_argument("--chunk", type=positive_int, default=2048,
                        help="KVzipPress chunk_size (default 2048, kvpress's)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "kvpress_head_to_head.json",
                        help="the verdicts' JSON (default: in the temporary folder, not the repository's root)")
    args = parser.parse_args()

    import transformers
    from kvpress import KVzipPress
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from lava_sglang.bench.documents import names_code, prompt_parts
    from lava_sglang.bench.quality import QualityConfig, benchmark_documents
    from lava_sglang.bench.stats import wilson_interval
    from lava_sglang.model import smollm2_path

    model_path = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    documents = benchmark_documents("retrieval", args.context, args.questions, lambda text: len(ids(text)))
    presses = {"full": None} | {f"KVzipPress keep {keep:g}": KVzipPress(compression_ratio=1 - keep,
                                                                        chunk_size=args.chunk)
                                for keep in args.keep}
    verdicts: dict[str, list[bool]] = {name: [] for name in presses}
    facts: list[int] = []
    started = time.time()
    for document in tqdm(documents, desc="kvpress", unit="document"):
        prefix = prompt_parts(document.text, "")[0]
        inputs = {"context_ids": torch.tensor([ids(prefix)]),
                  "questions_ids": [torch.tensor([ids(prompt_parts(document.text, q.text)[1])])
                                    for q in document.questions]}
        for name, press in presses.items():
            with torch.no_grad():  # the pipeline's own greedy loop, the project's prompt ids
                answers = pipe._forward(inputs, max_new_tokens=QualityConfig.retrieval_answer_tokens, press=press)
            verdicts[name] += [names_code(answer, q.answer) for q, answer in zip(document.questions, answers)]
        facts += [len(document.questions)] * len(document.questions)
    meta = {"kvpress": version("kvpress"),
            "transformers": transformers.__version__, "torch": torch.__version__, "context": args.context,
            "chunk_size": args.chunk, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "wall_seconds": round(time.time() - started, 1)}
    args.out.write_text(json.dumps({"meta": meta, "facts_per_document": facts, "verdicts": verdicts}, indent=1))
    print(f"wrote {args.out}")
    print(json.dumps(meta))
    print("| system | correct | 95% interval | 1 fact | 4 facts | 8 facts |\n|---|---|---|---|---|---|")
    for name, marks in verdicts.items():
        low, high = wilson_interval(sum(marks), len(marks))
        by_facts = [f"{sum(m for m, f in zip(marks, facts) if f == k)}/{sum(f == k for f in facts)}" for k in (1, 4, 8)]
        print(f"| {name} | {sum(marks)}/{len(marks)} | [{low:.2f}, {high:.2f}] | " + " | ".join(by_facts) + " |")


if __name__ == "__main__":
    main()
