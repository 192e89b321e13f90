"""Multi-question document QA with an SGLang frontend program: the document once, one fork per question.

    python examples/multi_question_qa.py --url http://127.0.0.1:30000 \
        --document examples/data/document.txt --questions examples/data/questions.txt

The program is `lava_sglang.frontend.multi_question_qa` (an `@sgl.function`): it adds the
document, syncs, and forks one branch per question. SGLang commits the document before the
branches run (a `max_new_tokens=0` request); a server started with `--kv-policy lava`
compresses that prefix once. Under the default `--kv-observe reconstruct` the first run's
branches decode on the full document while the server repeats it to score it; it is
compressed once that repetition is done, and later runs' branches decode against the
compressed copy (run the program twice to see both). The prompt is ChatML (SmolLM2, Qwen and
others; `lava_sglang.bench.documents.prompt_parts`).
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error

import sglang as sgl

from lava_sglang.bench.documents import prompt_parts
from lava_sglang.frontend import multi_question_qa

import example_inputs  # examples/example_inputs.py: this script's folder is on sys.path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    example_inputs.add_arguments(parser)
    args = parser.parse_args(argv)
    document, questions = example_inputs.read_inputs(parser, args)
    prefix = prompt_parts(document, "")[0]
    suffixes = [prompt_parts("", question)[1] for question in questions]

    started = time.perf_counter()
    try:
        state = multi_question_qa.run(prefix=prefix, suffixes=suffixes, max_tokens=args.max_tokens,
                                      backend=sgl.RuntimeEndpoint(args.url))
    except (RuntimeError, urllib.error.URLError) as error:  # a request failed (e.g. past the model's context),
        parser.exit(1, f"{parser.prog}: {error}\n")  # or the server went away: its log says why
    seconds = time.perf_counter() - started
    print(f"{len(questions)} questions on one {len(document.split())}-word document in {seconds:.1f} s\n")
    for question, answer, meta in zip(questions, state["answers"], state["meta_info"]):
        print(f"Q: {question}\nA: {answer.strip()}")
        print(f"   ({meta['cached_tokens']} of {meta['prompt_tokens']} prompt tokens from the cache)\n")
    print(example_inputs.store_summary(args.url))  # with --kv-policy, /server_info reports the store
    return 0


if __name__ == "__main__":
    sys.exit(main())
