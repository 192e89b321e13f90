"""The README documents every flag the project adds, with the code's defaults, and every
repository path it names exists."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from lava_sglang.cli import build_parser
from lava_sglang.sglang_plugin.config import FLAGS, FORK, RECONSTRUCT, SHARED, TAIL, KvPolicyConfig, default_window

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# Paths the README names in backticks that start at the repository root.
REPO_PATH = re.compile(r"`((?:docs|lava_sglang|scripts|tests|kernels|examples|patches)/[^`\s]*)`")


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "lava-sglang"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from _subcommands(subparser, f"{prefix} {name}")
    yield prefix, parser


def _cli_options() -> list[tuple[str, str]]:
    return [(command, option) for command, parser in _subcommands(build_parser()) for action in parser._actions
            for option in action.option_strings if option.startswith("--") and option != "--help"]


@pytest.mark.parametrize("command, option", _cli_options())
def test_every_cli_option_is_in_the_readme(command, option):
    assert f"`{option}`" in README or f"`{option} " in README, f"{command} {option} is not documented in README.md"


def _flag_tables() -> list[dict[str, str]]:
    """Each README table headed `| flag | default...`: flag -> its default cell."""
    lines, tables = README.splitlines(), []
    for index, line in enumerate(lines):
        if line.startswith("| flag | default"):
            rows = {}
            for row in lines[index + 2:]:
                if not row.startswith("| `--"):
                    break
                cells = [cell.strip() for cell in row.split("|")[1:-1]]
                rows[cells[0].strip("`")] = cells[1]
            tables.append(rows)
    return tables


def _documented(default: object, action: argparse.Action) -> str:
    """How a flag's table writes the parser's default."""
    if default == "":
        return "none"
    if isinstance(default, list) and action.choices is not None and sorted(default) == sorted(action.choices):
        return "both" if len(default) == 2 else "all"
    values = default if isinstance(default, list) else [default]
    text = " ".join(f"{value:g}" if isinstance(value, float) else str(value) for value in values)
    if isinstance(default, str) and Path(default).is_absolute() and Path(default).is_relative_to(REPO):
        text = str(Path(default).relative_to(REPO))
    return f"`{text}`"


# The commands with a table of flags (serve-reference's two are described in a sentence).
TABLED_COMMANDS = ("lava-sglang demo", "lava-sglang bench quality", "lava-sglang bench serve")


@pytest.mark.parametrize("command, parser", [(command, parser) for command, parser in _subcommands(build_parser())
                                             if command in TABLED_COMMANDS])
def test_each_command_has_one_readme_table_of_exactly_its_flags_with_their_defaults(command, parser):
    # A flag missing from its command's table, or a default that drifted, would pass the test above
    # wherever another table names a flag of that name.
    actions = {option: action for action in parser._actions for option in action.option_strings
               if option.startswith("--") and option != "--help"}
    tables = [table for table in _flag_tables() if set(table) == set(actions)]
    assert len(tables) == 1, f"{command}: {len(tables)} README tables list exactly its flags {sorted(actions)}"
    (table,) = tables
    for option, action in actions.items():
        if action.default not in (None, False):  # given no default, each table says what the command does
            expected = _documented(action.default, action)
            assert table[option].startswith(expected), f"{command} {option}: README says {table[option]!r}, " \
                                                       f"code {action.default!r}"


@pytest.mark.parametrize("dest", sorted(FLAGS))
def test_every_server_flag_is_in_the_readme_table_with_its_default(dest):
    flag, default, _ = FLAGS[dest]
    rows = [line for line in README.splitlines() if line.startswith(f"| `{flag}` |")]
    assert len(rows) == 1, f"{flag}: {len(rows)} rows in README.md's flag table"
    documented_default = rows[0].split("|")[2].strip().strip("`")
    # None: each policy's own value, or for the window the source's
    unset = {"kv_pool_kernel": "the policy's", "kv_alpha": f"{KvPolicyConfig.alpha}`, or the spec's `alpha=",
             "kv_window": f"{default_window(RECONSTRUCT, (FORK,))}` under `{RECONSTRUCT}` without `{SHARED}`, else "
                          f"`{default_window(TAIL, (FORK,))}"}
    expected = unset[dest] if default is None else default
    assert documented_default == expected, f"{flag}: README says {documented_default!r}, code {default!r}"


def test_every_repository_path_the_readme_names_exists():
    named = {match for match in REPO_PATH.findall(README) if not re.search(r"[{<*]", match)}
    assert len(named) > 20  # the pattern still finds the README's paths
    missing = sorted(path for path in named if not (REPO / path.rstrip(".,:;")).exists())
    assert not missing, f"README.md names paths that do not exist: {missing}"
