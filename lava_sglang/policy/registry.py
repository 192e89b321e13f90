"""The policies by name (the names `--kv-policy` and the benchmarks use)."""

from __future__ import annotations

from lava_sglang.policy.ada_snapkv import AdaSnapKV
from lava_sglang.policy.base import Policy
from lava_sglang.policy.full import Full
from lava_sglang.policy.kvzip import KVzip
from lava_sglang.policy.lava import Lava
from lava_sglang.policy.pyramidkv import PyramidKV
from lava_sglang.policy.snapkv import SnapKV
from lava_sglang.policy.specs import build, parse_spec
from lava_sglang.policy.streamingllm import StreamingLLM

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (Lava, KVzip, SnapKV, AdaSnapKV, PyramidKV, StreamingLLM, Full)
}


def make_policy(name: str, **options) -> Policy:
    """Build policy `name` with the options it has as fields; options it lacks but another
    policy has are ignored, so one set of options (window, pool_kernel, alpha) serves every
    policy, and an option no policy has is refused (a policy may still refuse a value it would
    not read: `lava` refuses alpha under its global threshold). `name` may be a spec with options of its
    own (`lava:layer_budget=global`, `specs.py`); those win."""
    return build(name, POLICIES, "policy", options)


def policy_name(spec: str) -> str:
    """The registered name of a policy spec ('lava:value_norm=false' -> 'lava')."""
    return parse_spec(spec, POLICIES, "policy")[0]
