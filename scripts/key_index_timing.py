"""Time a compressed-prefix lookup: `KeyIndex.longest_prefix_of` against a scan of every
stored key (how `compressed_match` found it before key_index.py), with many documents behind
one shared header, as a chat template gives them. Prints the machine and the inputs.

    python scripts/key_index_timing.py [--documents 4096] [--header 300] [--document-tokens 2000]
"""

import argparse
import platform
import time
from array import array

from lava_sglang.sglang_plugin.key_index import KeyIndex
from lava_sglang.sglang_plugin.touchpoints import radix_cache_api

RadixKey = radix_cache_api()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=4096)
    parser.add_argument("--header", type=int, default=300, help="tokens every document starts with")
    parser.add_argument("--document-tokens", type=int, default=2000, help="tokens after the header")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    header = list(range(1, args.header + 1))
    keys = [RadixKey(array("q", header + list(range(10**6 * (i + 1), 10**6 * (i + 1) + args.document_tokens))))
            for i in range(args.documents)]
    wanted = args.documents // 2
    query = RadixKey(array("q", list(keys[wanted].token_ids) + [5, 6, 7]))  # a document and its question
    index = KeyIndex()
    for number, key in enumerate(keys):
        index.add(key, number)

    def scan():
        best = None
        for number, key in enumerate(keys):
            if len(key) <= len(query) and key.match(query) == len(key) and (best is None or len(key) > len(keys[best])):
                best = number
        return best

    print(f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
          f"{platform.platform()}")
    print(f"inputs: {args.documents} documents of {args.header} + {args.document_tokens} tokens, a shared "
          f"{args.header}-token header; the median of {args.repeats} lookups")
    for name, lookup in (("scan of every key", scan), ("KeyIndex", lambda: index.longest_prefix_of(query))):
        assert lookup() == wanted
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            lookup()
            times.append(time.perf_counter() - started)
        print(f"| {name} | {1e3 * sorted(times)[len(times) // 2]:.3f} ms per lookup |")


if __name__ == "__main__":
    main()
