"""Specs: a registered name with field values of its own, as one string for flags and reports.

    'lava:layer_budget=global,value_norm=false'  ->  ('lava', {'layer_budget': 'global', 'value_norm': False})

Values are ints, finite floats, `true`/`false`, or else strings (`nan` and `inf` too, for a field
that takes a name; for any other they are refused); a field given twice takes its
last value (a spec extended by an override). Used for policies and observation
sources, so a benchmark can compare variants of one policy side by side under readable names.
"""

from __future__ import annotations

import dataclasses
import math

from lava_sglang.numbers import FLOAT_PATTERN, INT_PATTERN


def _value(text: str) -> bool | int | float | str:
    """A spec's value: numbers only in ASCII digits (`lava_sglang.numbers`); anything else
    stays a string, which a number field's check refuses."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if INT_PATTERN.fullmatch(text):
        return int(text)
    if FLOAT_PATTERN.fullmatch(text):
        return float(text)
    return text


def parse_spec(spec: object, registry: dict[str, type], what: str) -> tuple[str, dict]:
    """(name, options) of `spec` against `registry` (name -> dataclass); raises ValueError
    naming an unknown `what` or field."""
    if not isinstance(spec, str):
        raise ValueError(f"{what} must be one of {sorted(registry)}, got {spec!r}")
    name, _, option_text = spec.partition(":")
    if name not in registry:
        raise ValueError(f"{what} must be one of {sorted(registry)}, got {name!r}")
    defaults = {field.name: field.default for field in dataclasses.fields(registry[name])}
    options = {}
    for item in filter(None, option_text.split(",")):
        key, equals, value = item.partition("=")
        if not equals or key not in defaults:
            raise ValueError(f"{what} {spec!r}: options must be field=value with a field of {name} "
                             f"({', '.join(sorted(defaults))}), got {item!r}")
        options[key] = _value(value)
        if isinstance(options[key], float) and not math.isfinite(options[key]):  # no option takes nan or inf
            if isinstance(defaults[key], str):  # a name ("layer_budget=nan"): its own check lists the names
                options[key] = value
            else:
                raise ValueError(f"{what} {spec!r}: {key} must be a finite number, got {value!r}")
    return name, options


def build(spec: str, registry: dict[str, type], what: str, shared: dict):
    """The instance `spec` names, with the `shared` options its class has as fields (others,
    and None values, ignored: the class's default holds) overridden by the spec's own;
    validated. A shared option no class of the registry has is refused (a misspelling would
    otherwise leave the default in place, silently)."""
    name, own = parse_spec(spec, registry, what)
    known = {field.name for cls in registry.values() for field in dataclasses.fields(cls)}
    unknown = sorted(set(shared) - known)
    if unknown:
        raise ValueError(f"{what} options {', '.join(unknown)}: no {what} has them "
                         f"(options: {', '.join(sorted(known))})")
    cls = registry[name]
    fields = {field.name for field in dataclasses.fields(cls)}
    shared = {key: value for key, value in shared.items() if value is not None}
    instance = cls(**{key: value for key, value in {**shared, **own}.items() if key in fields})
    instance.validate()
    return instance


def spec_of(instance) -> str:
    """The spec that builds `instance` again with every field spelled out
    (`Lava()` -> 'lava:layer_budget=global,...'): a record of the options in effect that
    later default changes do not alter. For policies, whose fields are numbers, booleans and
    names: a text field holding a comma or reading as a number (`Reconstruct`'s instruction)
    would not parse back."""
    options = ",".join(f"{field.name}={str(value).lower() if isinstance(value, bool) else value}"
                       for field in dataclasses.fields(instance) for value in [getattr(instance, field.name)])
    return f"{instance.name}:{options}" if options else instance.name
