"""The inputs both examples take: a server, a document and its questions, an answer length."""

from __future__ import annotations

import argparse
from pathlib import Path

import requests

from lava_sglang.argtypes import positive_int

DATA = Path(__file__).resolve().parent / "data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:30000", help="the SGLang server (default %(default)s)")
    parser.add_argument("--document", type=Path, default=DATA / "document.txt",
                        help="text file with the document (default: examples/data/document.txt)")
    parser.add_argument("--questions", type=Path, default=DATA / "questions.txt",
                        help="text file, one question per line (default: examples/data/questions.txt)")
    parser.add_argument("--max-tokens", type=positive_int, default=24, help="answer length cap (default 24)")


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
        requests.get(args.url + "/health", timeout=30)
    except requests.RequestException as error:
        parser.exit(1, f"{parser.prog}: no SGLang server answers at --url {args.url} ({type(error).__name__}): start "
                       "examples/launch_server.sh and wait for 'The server is fired up'\n")
    return document, questions
