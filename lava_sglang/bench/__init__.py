"""Benchmarks: quality on the reference runtime, serving on SGLang servers."""

from __future__ import annotations

import subprocess
from pathlib import Path


def code_revision() -> str:
    """The lava-sglang code a benchmark ran: its git commit (with "-dirty" when the checkout
    has changes) where the package is a checkout, else the package version."""
    from lava_sglang import __version__

    checkout = Path(__file__).resolve().parents[2]
    try:
        described = subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty", "--abbrev=12"],
                                   capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return described or __version__
