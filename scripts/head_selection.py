"""Which tokens each KV head keeps under the default's one threshold: do heads need tokens of
their own, and do the heads that win most of the budget need it?

Under `--kv-observe reconstruct` the default `lava` plan keeps the best repetition scores of
every layer and KV head together (docs/allocation.md). On this model that gives a few heads
nearly the whole prefix and many heads little beyond the recent window. This script changes
the scores before that plan, one way at a time, and answers the benchmark's retrieval
questions:

- `per head` (the default's scores, unchanged);
- `shared by a layer`: every query head of a layer scores token t by the layer's largest
  repetition attention on t, so a layer's KV heads keep the same tokens;
- `shared by the model`: the same over every layer, so every head keeps the same tokens;
- `floor F`: each KV head's best F * B selectable tokens are kept whatever the threshold
  (B = keep ratio x selectable tokens; the plan's average, which counts the window in the
  budget, is a few tokens less);
- `cap C`: no KV head keeps more than C x its selectable tokens (its other scores set to 0,
  below every other score).

    python scripts/head_selection.py --context 1024 --name 1k_seed0

The harness is `lava_sglang.bench.score_transforms`. Writes <out>/<name>.json and
<out>/<name>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from lava_sglang.bench import score_transforms
from lava_sglang.policy import Reconstruct, make_policy
from lava_sglang.reference.runtime import Observation, PrefixCapture, ReferenceRuntime

OUT_DIR = Path(__file__).resolve().parents[1] / "docs" / "results" / "reuse" / "head_selection"


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text!r}")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    score_transforms.add_arguments(parser, OUT_DIR)
    parser.add_argument("--floors", type=fraction, nargs="*", default=[0.25, 0.5],
                        help="floors F, fractions of the average head budget (default 0.25 0.5)")
    parser.add_argument("--caps", type=fraction, nargs="*", default=[0.5],
                        help="caps C, fractions of a head's selectable tokens (default 0.5)")
    args = score_transforms.parse_arguments(parser)
    policy = make_policy(args.policy)
    if getattr(policy, "pool_kernel", 1) != 1 or policy.uses_layer_entropy:
        # a forced token's inf would spread to its neighbours, or make a layer's entropy nan
        parser.error(f"--policy {args.policy}: the floors and caps are set on the scores the threshold reads; "
                     "use a policy without pooling or entropy layer budgets")
    return args


def shared(observation: Observation, by_model: bool) -> Observation:
    """Every query head of a layer (by_model: of every layer) scores token t alike: the
    largest repetition attention on t among them."""
    token_max = [attention.float().amax(0) for attention in observation.repeat_attention]
    if by_model:
        model_max = torch.stack(token_max).amax(0)
        token_max = [model_max] * len(token_max)
    return dataclasses.replace(observation, repeat_attention=[
        best[None].expand_as(attention).clone() for best, attention in zip(token_max, observation.repeat_attention)])


def bounded(observation: Observation, num_kv_heads: int, selectable: int, floor: int = 0,
            cap: int | None = None) -> Observation:
    """Each KV head's best `floor` selectable tokens forced (scored inf in every query head of
    its group) and, with a cap, all but its best `cap` scored 0. A KV head's tokens are ranked
    by the largest attention among its group's query heads (the plan's GQA reduction)."""
    changed = []
    for attention in observation.repeat_attention:
        grouped = attention.float().clone().view(num_kv_heads, -1, attention.shape[1])  # [Hkv, G, n]
        order = grouped[..., :selectable].amax(1).argsort(dim=-1, descending=True, stable=True)  # [Hkv, m]
        if cap is not None:
            grouped.scatter_(2, order[:, None, cap:].expand(-1, grouped.shape[1], -1), 0.0)
        grouped.scatter_(2, order[:, None, :floor].expand(-1, grouped.shape[1], -1), torch.inf)
        changed.append(grouped.view_as(attention))
    return dataclasses.replace(observation, repeat_attention=changed)


def main() -> None:
    args = parse_args()
    names = (["per head", "shared by a layer", "shared by the model"] + [f"floor {floor:g}" for floor in args.floors]
             + [f"cap {cap:g}" for cap in args.caps])

    def variants(runtime: ReferenceRuntime, capture: PrefixCapture) -> dict[str, score_transforms.Transform]:
        window = make_policy(args.policy, window=Reconstruct.kept_window).window  # the plan's, as compress finds it
        selectable = capture.seq_len - window
        num_kv_heads = runtime.model.config.num_key_value_heads
        transforms = {"per head": lambda observation, keep: observation,
                      "shared by a layer": lambda observation, keep: shared(observation, by_model=False),
                      "shared by the model": lambda observation, keep: shared(observation, by_model=True)}
        for floor in args.floors:
            transforms[f"floor {floor:g}"] = lambda observation, keep, floor=floor: bounded(
                observation, num_kv_heads, selectable, floor=int(floor * keep * selectable))
        for cap in args.caps:
            transforms[f"cap {cap:g}"] = lambda observation, keep, cap=cap: bounded(
                observation, num_kv_heads, selectable, cap=int(cap * selectable))
        return transforms

    score_transforms.run(args, "head_selection.py", "Head selection", names, variants)


if __name__ == "__main__":
    main()
