"""How many planted codes of the quality benchmark lie in a document's always-kept recent window.

Every plan keeps the prefix's last `window` tokens whatever the budget; a code that starts
there is kept by any policy. Counted for the retrieval questions of `bench quality --contexts
1024 2048 --questions 80 80` at seeds 0, 1 and 2 (the three sets of docs/results/reuse/intervals):

    python scripts/codes_in_window.py
"""

from __future__ import annotations

import argparse

from transformers import AutoTokenizer

from lava_sglang.bench.documents import prompt_parts
from lava_sglang.bench.quality import benchmark_documents
from lava_sglang.model import smollm2_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--questions", type=int, default=80, help="retrieval questions per context (default 80)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--windows", type=int, nargs="+", default=[32, 8])
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    count = {window: 0 for window in args.windows}
    questions = 0
    for seed in args.seeds:
        for context in args.contexts:
            for document in benchmark_documents("retrieval", context, args.questions,
                                                lambda text: len(tokenizer(text).input_ids), seed):
                prefix = prompt_parts(document.text, "")[0]
                prefix_tokens = len(tokenizer(prefix).input_ids)
                for question in document.questions:
                    questions += 1
                    # tokens from the code's first to the prefix's end
                    from_end = prefix_tokens - len(tokenizer(prefix[:prefix.index(question.answer)]).input_ids)
                    inside = [window for window in args.windows if from_end <= window]
                    for window in inside:
                        count[window] += 1
                    if inside:
                        print(f"seed {seed}, {context} tokens: code {question.answer} starts {from_end} tokens "
                              "before the prefix's end")
    print(f"{questions} questions; codes starting in the last " +
          ", ".join(f"{window} tokens: {count[window]}" for window in args.windows))


if __name__ == "__main__":
    main()
