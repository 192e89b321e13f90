"""LAVa and baseline KV-cache policies in pure PyTorch (no SGLang import).

`compress_plan` is the entry point; see lava.md for the algorithm.
"""

from lava_sglang.policy.base import LayerScores, Policy, WindowPolicy
from lava_sglang.policy.observe import (OBSERVE_SOURCES, REPEAT_NORMALIZATIONS, REPEAT_VIEWS, WINDOW_COMBINES,
                                        Branches, Observe, ObservationWindow, Reconstruct, Tail, assistant_turn_text,
                                        combine_window_masses, make_observe, repeat_attention_chunk,
                                        repeat_attention_max, repeat_chunks, repeat_log_sum_exp, repeat_view_positions)
from lava_sglang.policy.plan import (CompressionPlan, HeadShard, PlanBuilder, PlanRefused, budget_evicts,
                                    compress_plan, resolve_budget)
from lava_sglang.policy.registry import POLICIES, make_policy, policy_name
from lava_sglang.policy.specs import spec_of

__all__ = [
    "OBSERVE_SOURCES",
    "REPEAT_NORMALIZATIONS",
    "REPEAT_VIEWS",
    "POLICIES",
    "WINDOW_COMBINES",
    "Branches",
    "Observe",
    "ObservationWindow",
    "Reconstruct",
    "Tail",
    "assistant_turn_text",
    "budget_evicts",
    "combine_window_masses",
    "make_observe",
    "repeat_attention_chunk",
    "repeat_attention_max",
    "repeat_log_sum_exp",
    "repeat_chunks",
    "repeat_view_positions",
    "CompressionPlan",
    "HeadShard",
    "LayerScores",
    "PlanBuilder",
    "PlanRefused",
    "Policy",
    "WindowPolicy",
    "compress_plan",
    "make_policy",
    "policy_name",
    "resolve_budget",
    "spec_of",
]
