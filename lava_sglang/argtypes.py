"""argparse value types and choices shared by the `lava-sglang` commands.

Nothing here imports torch, so that the commands parse and answer `--help` at once; the
choices are checked against the policy registry and the observation sources by a test.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lava_sglang.bench.documents import MAX_FACTS
from lava_sglang.numbers import parse_float, parse_int

#: The policies that evict (the full cache is the reference every benchmark runs anyway).
COMPRESSING_POLICIES = ("lava", "kvzip", "snapkv", "ada_snapkv", "pyramidkv", "streamingllm")
#: What scores a document compressed once (`lava_sglang.policy.observe.OBSERVE_SOURCES`).
OBSERVE_SOURCES = ("tail", "branches", "reconstruct")


#: The server's default --kv-min-prefix: a shorter prompt prefix is never compressed.
DEFAULT_MIN_PREFIX = 256


#: `bench quality`'s observation window (tail, branches, query_aware); a document must hold
#: twice it (`QualityConfig.validate`).
QUALITY_WINDOW = 32


def keep_ratio(text: str) -> float:
    value = parse_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"keep ratio must be in (0, 1], got {text}")
    return value


def positive_float(text: str) -> float:
    value = parse_float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def at_least(minimum: int):
    """An int argument type that takes `minimum` or more."""
    def parse(text: str) -> int:
        value = parse_int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text}")
        return value

    parse.__name__ = f"int >= {minimum}"  # argparse names the type in its messages
    return parse


positive_int = at_least(1)


def named_spec(names: tuple[str, ...], what: str, refused: dict[str, str] | None = None):
    """An argument type for `name` or `name:field=value,...` whose name is one of `names`
    (the options are checked where the spec is built, which needs torch); `refused` maps a
    known name the flag does not take to the reason."""
    def parse(text: str) -> str:
        name = text.split(":", 1)[0]
        if refused and name in refused:
            raise argparse.ArgumentTypeError(f"{name!r}: {refused[name]}")
        if name not in names:
            raise argparse.ArgumentTypeError(f"{what} must be one of {', '.join(names)}, optionally with "
                                             f"options (name:field=value,...), got {text!r}")
        return text

    parse.__name__ = what
    return parse


def fact_count(text: str) -> int:
    """Planted facts per document: 1 to `documents.MAX_FACTS` (one name per fact)."""
    value = positive_int(text)
    if value > MAX_FACTS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_FACTS} (facts per document), got {text}")
    return value


def file_stem(text: str) -> str:
    """A results file's stem (`--name`): a name, not a path (`--out` is the folder)."""
    if not text or text in (".", "..") or "/" in text or "\\" in text:
        raise argparse.ArgumentTypeError(f"must be a file name without a folder (the folder is --out), got {text!r}")
    return text


def output_folder(path: Path) -> Path:
    """`--out`, made (with its parents) before a run rather than after it, so that a run is
    not lost where its results cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file of that name, a parent that is a file, no permission
        raise ValueError(f"--out {path}: cannot make that folder ({error.strerror or error})") from None
    return path


def replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (a sibling written, then renamed over it): a
    run killed while it writes its results, or a write that fails, leaves the earlier file. A
    symlink's target is replaced, and the link kept."""
    path = Path(os.path.realpath(path))
    staging = path.with_name(f".{path.name}.{os.getpid()}.writing")  # two runs writing one file do not share it
    try:
        staging.write_text(text)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def read_notes(given: str | None, default: Path | None) -> str | None:
    """The text of a report's "Reading the results": none for `--notes none`; the file
    `--notes` names, which must exist (a typo would publish the report without it); else
    `default` when there is one and it exists (the commands pass it only to `--report-only`:
    the notes beside a results file read that run, not a new one)."""
    if given == "none":
        return None
    if given is not None:
        path = Path(given)
        if not path.exists():
            raise ValueError(f"--notes: no file {given}")
        return path.read_text() or None
    return default.read_text() if default is not None and default.is_file() else None


#: What a benchmark's --report-only reads; its other flags shape a run, and it runs nothing.
REPORT_FLAGS = ("out", "notes", "report_only", "no_progress")


def refuse_run_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, read: tuple[str, ...]) -> None:
    """--report-only rebuilds a report from a finished run: a flag it does not read (those not
    in `read`), given other than its default, would look as if it changed the report."""
    defaults = vars(parser.parse_args([]))
    ignored = [f"--{dest.replace('_', '-')}" for dest, default in defaults.items()
               if dest not in read and getattr(args, dest) != default]
    if ignored:
        raise ValueError(f"--report-only rebuilds the report from the run's results; {', '.join(ignored)} "
                         "would change a run, not its report: leave them out")


def read_json(path: Path) -> object:
    """A results file's JSON; ValueError naming the file when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a JSON file ({error})") from None


def check_results(result: object, source: str, command: str, meta_keys: tuple[str, ...]) -> dict:
    """`result` when it has the shape `command` writes: {"meta": {<meta_keys>...}, "records":
    [{"policy": ...}, ...]}; else ValueError naming `source`, before a report is rebuilt from
    it (a file of another command, read by a typo in --name, would fail half-way with a traceback)."""
    meta = result.get("meta") if isinstance(result, dict) else None
    records = result.get("records") if isinstance(result, dict) else None
    if not (isinstance(meta, dict) and all(key in meta for key in meta_keys) and isinstance(records, list)
            and all(isinstance(record, dict) and "policy" in record for record in records)):
        raise ValueError(f"{source} is not what `{command}` writes: its meta (with {', '.join(meta_keys)}) and its "
                         "records")
    return result
