"""Benchmarks: quality on the reference runtime, serving on SGLang servers."""

from __future__ import annotations

import subprocess
from pathlib import Path


def code_revision() -> str:
    """The lava-sglang code a benchmark runs: its git commit (with "-dirty" when the checkout
    has changes) where the package is this project's checkout, else the package version (an
    installed copy inside another repository must not report that one's commit). Read it
    when the run starts: the run's own results, written into the checkout, would dirty it."""
    from lava_sglang import __version__

    checkout = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != checkout:
            return __version__
        return git("describe", "--always", "--dirty", "--abbrev=12") or __version__
    except (OSError, subprocess.SubprocessError):
        return __version__
