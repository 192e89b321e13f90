"""Several questions about one long document through SGLang's OpenAI-compatible API.

    python examples/openai_shared_document.py --url http://127.0.0.1:30000 \
        --document examples/data/document.txt --questions examples/data/questions.txt

Every request is a chat completion whose messages start with the same system message and
the same document, so they share one long prompt prefix. Start the server with
`--kv-compress-on shared` (or `fork,shared`): the first request is served and cached as
usual; when the second one shares at least `--kv-min-prefix` tokens of it, the shared prefix
is compressed once and every later request decodes against the compressed copy. The
OpenAI usage reports how many prompt tokens came from the cache (`--enable-cache-report`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import time

import openai

from lava_sglang.argtypes import positive_int
from lava_sglang.bench.documents import SYSTEM_PROMPT

import example_inputs  # examples/example_inputs.py: this script's folder is on sys.path


def ask(client: openai.OpenAI, document: str, question: str, max_tokens: int):
    return client.chat.completions.create(
        model="default", temperature=0, max_tokens=max_tokens,
        messages=[{"role": "system", "content": SYSTEM_PROMPT},
                  {"role": "user", "content": f"Document:\n{document}\n\nQuestion: {question}"}],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    example_inputs.add_arguments(parser)
    parser.add_argument("--concurrency", type=positive_int, default=1,
                        help="requests in flight after the first one (default 1)")
    args = parser.parse_args(argv)
    document, questions = example_inputs.read_inputs(parser, args)
    # No retries: a request that timed out would prefill the whole document again.
    client = openai.OpenAI(base_url=args.url + "/v1", api_key="not-needed", max_retries=0)

    started = time.perf_counter()
    try:
        # The first request puts the document in the cache; the rest share it, a few at a time.
        responses = [ask(client, document, questions[0], args.max_tokens)]
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            responses += list(pool.map(lambda q: ask(client, document, q, args.max_tokens), questions[1:]))
    except openai.APIError as error:  # e.g. a document past the model's context: the server says why
        parser.exit(1, f"{parser.prog}: the server refused or failed a request: {error}\n")
    print(f"{len(questions)} chat completions sharing one document in {time.perf_counter() - started:.1f} s\n")
    for question, response in zip(questions, responses):
        usage = response.usage
        details = getattr(usage, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", None) if details else None
        print(f"Q: {question}\nA: {response.choices[0].message.content.strip()}")
        print(f"   ({cached if cached is not None else '?'} of {usage.prompt_tokens} prompt tokens from the cache)\n")
    print(example_inputs.store_summary(args.url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
