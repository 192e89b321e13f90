"""What a document's repetition (`--kv-observe reconstruct`) costs against its prefill when
nothing else runs: each document is committed alone as a fork prefix (no branch beside it),
and the server's own figures for it are read once it is compressed (`/server_info`,
`last_repetition`). `lava-sglang bench serve` reports the same figures under its workload,
where the first visit's branches decode beside the repetition.

    python scripts/repetition_cost.py --context 2048 --documents 4
    python scripts/repetition_cost.py --context 2048 --documents 4 --server-args="--kv-observe-view chunk"

The documents are the serving benchmark's (`retrieval_documents`, 4 facts each); the server is
the CPU engine in fp32 (or the GPU), `--kv-policy POLICY` (default lava) with the defaults and
`--server-args`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import time

import requests
from tqdm import tqdm

from lava_sglang.argtypes import at_least, positive_int
from lava_sglang.bench.documents import prompt_parts, retrieval_documents
from lava_sglang.bench.serve import MIN_CONTEXT
from lava_sglang.model import smollm2_path
from lava_sglang.sglang_plugin.server_process import ServerProcess


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=at_least(MIN_CONTEXT), default=2048, help="document tokens (default 2048)")
    parser.add_argument("--documents", type=positive_int, default=4,
                        help="documents, one after the other (default 4; the first also warms the server up)")
    parser.add_argument("--seed", type=at_least(0), default=5, help="document seed (default 5)")
    parser.add_argument("--policy", default="lava", help="--kv-policy of the server (default lava)")
    parser.add_argument("--server-args", default="", help="more server flags, e.g. \"--kv-observe-view chunk\"")
    parser.add_argument("--timeout", type=positive_int, default=600,
                        help="seconds to wait for one document's compression (default 600)")
    args = parser.parse_args()
    try:
        args.server_args = shlex.split(args.server_args)
    except ValueError as error:  # an unbalanced quote
        parser.error(f"--server-args: {error}")
    return args


def store(url: str) -> dict:
    return requests.get(url + "/server_info", timeout=60).json()["internal_states"][0]["lava_kv_policy"]["store"]


def main() -> None:
    args = parse_args()
    import torch
    from transformers import AutoTokenizer

    model = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    documents = retrieval_documents(lambda text: len(tokenizer(text).input_ids), args.context,
                                    [4] * args.documents, seed=args.seed)
    server_args = ["--kv-policy", args.policy, *args.server_args]
    if not torch.cuda.is_available():
        server_args += ["--dtype", "float32"]  # the CPU engine's exact mode
    print(f"inputs: {args.documents} documents of ~{args.context} tokens (seed {args.seed}), each committed alone; "
          f"server flags {' '.join(server_args)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
    rows = []
    server = ServerProcess(model, server_args)
    print(f"server log: {server.log_path}")
    with server:
        for document in tqdm(documents, desc="documents"):
            before = store(server.url)
            compressions, repeated = before["compressions"], before["repetition_cost"]["documents"]
            commit = {"text": prompt_parts(document.text, "")[0], "sampling_params": {"max_new_tokens": 0}}
            requests.post(server.url + "/generate", json=commit, timeout=args.timeout).raise_for_status()
            deadline = time.monotonic() + args.timeout
            while (now := store(server.url))["compressions"] == compressions:
                if time.monotonic() > deadline:
                    raise SystemExit(f"repetition_cost: a document was not compressed within {args.timeout} s")
                time.sleep(0.2)
            if now["repetition_cost"]["documents"] == repeated:
                raise SystemExit("repetition_cost: a document was compressed without a timed repetition (by its "
                                 f"tail, or its prefill not timed); the server's log says why: {server.log_path}")
            rows.append(now["last_repetition"])
    if any(row["prefill_seconds"] is None or row["forward_seconds"] is None for row in rows):
        raise SystemExit("repetition_cost: the server did not time a prefill or a chunk's forwards")
    print()
    print("| document tokens | chunks | tokens prefilled | prefill s | repetition s (x prefill) | its forwards s "
          "(x prefill) | scoring s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        prefill = row["prefill_seconds"]
        print(f"| {row['prefix_tokens']} | {row['chunks']} | {row['tokens_prefilled']} | {prefill:.2f} | "
              f"{row['seconds']:.2f} ({row['seconds'] / prefill:.2f}x) | {row['forward_seconds']:.2f} "
              f"({row['forward_seconds'] / prefill:.2f}x) | {row['scoring_seconds']:.2f} |")
    later = rows[1:] or rows  # the first document also pays the server's warm-up
    forwards = statistics.mean(row["forward_seconds"] / row["prefill_seconds"] for row in later)
    wall = statistics.mean(row["seconds"] / row["prefill_seconds"] for row in later)
    print(f"\nafter the first document, on average: its forwards {forwards:.2f}x the prefill, wall {wall:.2f}x")


if __name__ == "__main__":
    main()
