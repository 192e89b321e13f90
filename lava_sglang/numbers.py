"""Numbers as a user writes them in a flag or a spec: ASCII digits only.

Python's int() and float() also take "3_2", " 8 " and "８" (a full-width digit); in a flag those
are more likely typos than numbers, so every flag and spec the project parses reads numbers
here (an SGLang built with patches/ types the --kv-* flags with its own parser first).
No imports beyond the standard library: the commands parse their flags before torch loads.
"""

from __future__ import annotations

import re

INT_PATTERN = re.compile(r"[+-]?[0-9]+")
FLOAT_PATTERN = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(nan|inf|infinity)",
                           re.IGNORECASE)


def parse_int(text: str | int) -> int:
    """`text` as an int; ValueError unless it is one written in ASCII digits, with an optional
    sign. An int is taken as it is (SGLang built with the project's patch types its flags)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if not isinstance(text, str) or not INT_PATTERN.fullmatch(text):
        raise ValueError(f"not an int: {text!r}")
    return int(text)


def parse_float(text: str | float) -> float:
    """`text` as a float (an int, a decimal, an exponent, nan or inf); ValueError otherwise.
    A number is taken as it is."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str) or not FLOAT_PATTERN.fullmatch(text):  # the pattern takes ints too
        raise ValueError(f"not a number: {text!r}")
    return float(text)
