"""Type checks shared by every layer's argument validation (no torch, no SGLang).

`bool` is an `int` subclass in Python, so `True` would pass for 1 where an int or a number is
asked for; these say no.
"""

from __future__ import annotations

import numbers


def is_int(value: object) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A real number (an int, a float, numpy's of any width), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_bool(name: str, value: object) -> None:
    """A bool, where a flag field must be one (1 or "true" would pass a truth test)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
