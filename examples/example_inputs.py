"""The inputs both examples take (a server, a document and its questions, an answer length)
and what they print of the server's compressed store."""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlparse

import requests

from lava_sglang.argtypes import positive_int
from lava_sglang.bench.serve import server_counters

DATA = Path(__file__).resolve().parent / "data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", type=server_url, default="http://127.0.0.1:30000",
                        help="the SGLang server (default %(default)s)")
    parser.add_argument("--document", type=Path, default=DATA / "document.txt",
                        help="text file with the document (default: examples/data/document.txt)")
    parser.add_argument("--questions", type=Path, default=DATA / "questions.txt",
                        help="text file, one question per line (default: examples/data/questions.txt)")
    parser.add_argument("--max-tokens", type=positive_int, default=24, help="answer length cap (default 24)")


def server_url(text: str) -> str:
    """An http(s) URL, without a trailing slash (the examples append "/health", "/v1")."""
    if urlparse(text).scheme not in ("http", "https") or not urlparse(text).netloc:
        raise argparse.ArgumentTypeError(f"give the server as http://HOST:PORT, got {text!r}")
    return text.rstrip("/")


def read_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, list[str]]:
    """The document and its questions, or the parser's one-line error: a file that is not
    there, an empty document, no question."""
    texts = {}
    for flag, path in (("--document", args.document), ("--questions", args.questions)):
        try:
            texts[flag] = path.read_text()
        except OSError as error:
            parser.error(f"{flag} {path}: {error.strerror or error}")
    document = texts["--document"].strip()
    questions = [line.strip() for line in texts["--questions"].splitlines() if line.strip()]
    if not document:
        parser.error(f"--document {args.document}: the file is empty")
    if not questions:
        parser.error(f"--questions {args.questions}: no question in it (one per line)")
    try:  # before the first request, whose failure would be a traceback from deep in a client library
        health = requests.get(args.url + "/health", timeout=30)
    except requests.RequestException as error:
        parser.exit(1, f"{parser.prog}: no SGLang server answers at --url {args.url} ({type(error).__name__}): start "
                       "examples/launch_server.sh and wait for 'The server is fired up'\n")
    if health.status_code != 200:
        parser.exit(1, f"{parser.prog}: --url {args.url}/health answered HTTP {health.status_code}: not an SGLang "
                       "server, or one still starting or unhealthy (its log says which)\n")
    return document, questions


def store_summary(url: str) -> str:
    """One line on the server's compressed store, over every data-parallel rank."""
    try:
        states = requests.get(url + "/server_info", timeout=60).json()["internal_states"]
        policy = states[0].get("lava_kv_policy", {})
    except (requests.RequestException, ValueError, LookupError, TypeError, AttributeError) as error:
        return f"Server: no store figures from {url}/server_info ({type(error).__name__}; a router?)"
    store = server_counters(states)
    if not store:
        return "Server: no compressed store (stock SGLang or --kv-policy none)"
    full = store["bytes_stored"] + store["bytes_saved"]
    return (f"Server: --kv-policy {policy.get('policy')} --kv-budget {policy.get('budget')}: {store['entries']} "
            f"compressed prefix(es), {store['prefix_tokens']} tokens, {store['bytes_stored'] / 2**20:.1f} MiB "
            f"stored instead of {full / 2**20:.1f} MiB, compressed in {store['compress_seconds'] * 1e3:.0f} ms")
