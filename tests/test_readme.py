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
