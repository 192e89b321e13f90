"""How a token's repetition attention becomes its score: the query heads of a KV head's group
combined by their mean instead of their largest value, the attention weighted by the size of
the token's value, and a number's digits scored together.

The default `lava` plan scores prefix token t of KV head h by the largest repetition attention
any query of any query head of h's group pays it (KVzip's score, docs/kvzip.md), and keeps the
best scores over every layer and KV head. Four changes to that score, one at a time:

- `group mean`: the mean over the group's query heads, not the largest: a token one query head
  needs and the others ignore ranks lower;
- `x value norm`: the attention times the L1 norm of t's value in h, a_t * |v_t| (the size of
  what t adds to the head's output; LAVa scales a whole head by its largest value norm, which
  `--kv-policy lava:value_norm=true` measures, docs/allocation.md);
- `x value norm / head mean`: the same divided by the head's mean value norm, so that a head
  whose values are larger overall gains no budget for that alone;
- `numbers kept whole`: every digit of a number (a run of single-digit tokens, as SmolLM2's
  tokenizer splits numbers) scored by the run's largest score, per query head, so a head
  keeps a number whole or not at all (a code with one digit evicted is a wrong code).

    python scripts/score_weighting.py --context 1024 --name 1k_seed0

The harness is `lava_sglang.bench.score_transforms`. Writes <out>/<name>.json and
<out>/<name>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from lava_sglang.bench import score_transforms
from lava_sglang.policy import make_policy
from lava_sglang.policy.scores import value_l1_norms
from lava_sglang.reference.runtime import Observation, PrefixCapture, ReferenceRuntime

OUT_DIR = Path(__file__).resolve().parents[1] / "docs" / "results" / "reuse" / "score_weighting"
VARIANTS = ["max (the default)", "group mean", "x value norm", "x value norm / head mean", "numbers kept whole"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    score_transforms.add_arguments(parser, OUT_DIR)
    args = score_transforms.parse_arguments(parser)
    if getattr(make_policy(args.policy), "scale_by_value_norm", False):  # it would weight the values twice
        parser.error(f"--policy {args.policy}: the value weights replace LAVa's value norm; use value_norm=false")
    return args


def group_mean(observation: Observation, num_kv_heads: int) -> Observation:
    """Every query head of a group scores token t by the group's mean attention on t."""
    changed = []
    for attention in observation.repeat_attention:
        grouped = attention.float().view(num_kv_heads, -1, attention.shape[1])  # [Hkv, G, n]
        changed.append(grouped.mean(1, keepdim=True).expand_as(grouped).reshape(attention.shape))
    return dataclasses.replace(observation, repeat_attention=changed)


def value_weighted(observation: Observation, values: list[torch.Tensor], per_head_mean: bool) -> Observation:
    """Each query head's attention on t times the L1 norm of t's value in its KV head
    (values[layer]: [Hkv, n, d]); with per_head_mean, divided by that head's mean norm."""
    changed = []
    for attention, layer_values in zip(observation.repeat_attention, values):
        norms = value_l1_norms(layer_values)  # [Hkv, n]
        if per_head_mean:
            norms = norms / norms.mean(-1, keepdim=True)
        grouped = attention.float().view(norms.shape[0], -1, attention.shape[1])  # [Hkv, G, n]
        changed.append((grouped * norms[:, None]).reshape(attention.shape))
    return dataclasses.replace(observation, repeat_attention=changed)


def digit_runs(tokens: list[str]) -> list[tuple[int, int]]:
    """The [start, end) spans of consecutive tokens that are each one ASCII digit ("³" is a
    digit to str.isdigit)."""
    runs, start = [], None
    for index, token in enumerate(tokens + [""]):
        if len(token) == 1 and token in "0123456789":
            start = index if start is None else start
        elif start is not None:
            runs.append((start, index))
            start = None
    return runs


def whole_spans(observation: Observation, spans: list[tuple[int, int]]) -> Observation:
    """Every token of each span scored by the span's largest score, per query head."""
    changed = []
    for attention in observation.repeat_attention:
        attention = attention.float().clone()
        for start, end in spans:
            attention[:, start:end] = attention[:, start:end].amax(1, keepdim=True)
        changed.append(attention)
    return dataclasses.replace(observation, repeat_attention=changed)


def main() -> None:
    args = parse_args()

    def variants(runtime: ReferenceRuntime, capture: PrefixCapture) -> dict[str, score_transforms.Transform]:
        num_kv_heads = runtime.model.config.num_key_value_heads
        numbers = digit_runs([runtime.tokenizer.decode([token]) for token in capture.token_ids])
        return dict(zip(VARIANTS, [
            lambda observation, keep: observation,
            lambda observation, keep: group_mean(observation, num_kv_heads),
            lambda observation, keep: value_weighted(observation, capture.values, per_head_mean=False),
            lambda observation, keep: value_weighted(observation, capture.values, per_head_mean=True),
            lambda observation, keep: whole_spans(observation, numbers),
        ]))

    score_transforms.run(args, "score_weighting.py", "Score weighting", VARIANTS, variants)


if __name__ == "__main__":
    main()
