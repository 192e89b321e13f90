"""The policies by name (the names `--kv-policy` and the benchmarks use)."""

from __future__ import annotations

import dataclasses

from lava_sglang.policy.ada_snapkv import AdaSnapKV
from lava_sglang.policy.base import Policy
from lava_sglang.policy.full import Full
from lava_sglang.policy.lava import Lava
from lava_sglang.policy.pyramidkv import PyramidKV
from lava_sglang.policy.snapkv import SnapKV
from lava_sglang.policy.streamingllm import StreamingLLM

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (Lava, SnapKV, AdaSnapKV, PyramidKV, StreamingLLM, Full)
}


def make_policy(name: str, **options) -> Policy:
    """Build policy `name` with the options it has as fields; options it lacks are ignored,
    so one set of options (window, pool_kernel, alpha) serves every policy."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
    cls = POLICIES[name]
    fields = {field.name for field in dataclasses.fields(cls)}
    policy = cls(**{key: value for key, value in options.items() if key in fields})
    policy.validate()
    return policy
