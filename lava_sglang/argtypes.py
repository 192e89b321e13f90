"""argparse value types shared by the `lava-sglang` commands."""

from __future__ import annotations

import argparse


def keep_ratio(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"keep ratio must be in (0, 1], got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value
