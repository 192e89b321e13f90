"""Repetition scores weighted by each token's surprisal: does a query-agnostic prior on
unpredictable tokens keep the planted facts that the repetition alone does not single out?

KVzip's repetition scores a token by the attention a copy of the document pays it; on this
model they keep a planted code's tokens at about the keep ratio (`scripts/fact_coverage.py`).
A code is random digits, which the document's own prefill predicts badly. This script
weights every layer's and query head's repetition attention on token t by
(nll_t / mean nll) ** gamma, nll_t = -log p(x_t | x_<t) under the same model's prefill
(gamma 0: the plain repetition, the default's scores), plans with a policy (the default
`lava`: one global threshold) and answers the benchmark's retrieval questions.

    python scripts/surprisal_prior.py --context 2048 --questions 48 --facts 8 --seed 1 --name facts8_2k_seed1

The harness is `lava_sglang.bench.score_transforms` (the benchmark's documents and questions);
the surprisal needs the prefill's logits at every position, which the reference runtime has
and the server does not compute (SGLang's extend keeps the last token's). Writes
<out>/<name>.json and <out>/<name>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch

from lava_sglang.bench import score_transforms
from lava_sglang.reference.runtime import Observation, PrefixCapture, ReferenceRuntime

OUT_DIR = Path(__file__).resolve().parents[1] / "docs" / "results" / "reuse" / "surprisal"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    score_transforms.add_arguments(parser, OUT_DIR)
    parser.add_argument("--gammas", type=float, nargs="+", default=[1.0, 2.0, 3.0],
                        help="surprisal exponents besides 0, the plain repetition (default 1 2 3)")
    args = score_transforms.parse_arguments(parser)
    if any(not (math.isfinite(gamma) and gamma > 0) for gamma in args.gammas):
        parser.error("--gammas takes exponents > 0 (0, the plain repetition, is always run)")
    return args


def weighted(observation: Observation, nll: torch.Tensor, gamma: float) -> Observation:
    """The observation with each token's repetition attention times (nll / mean nll) ** gamma."""
    weight = (nll.clamp_min(1e-3) / nll[1:].mean()) ** gamma
    return dataclasses.replace(observation, repeat_attention=[
        attention * weight[None, :attention.shape[1]].to(attention) for attention in observation.repeat_attention])


def main() -> None:
    args = parse_args()
    gammas = [0.0, *args.gammas]
    names = [f"gamma {gamma:g}" for gamma in gammas]

    def variants(runtime: ReferenceRuntime, capture: PrefixCapture) -> dict[str, score_transforms.Transform]:
        nll = runtime.surprisal(capture.token_ids)
        return {name: (lambda observation, keep, gamma=gamma:
                       observation if gamma == 0 else weighted(observation, nll, gamma))
                for name, gamma in zip(names, gammas)}

    score_transforms.run(args, "surprisal_prior.py", "Surprisal prior", names, variants)


if __name__ == "__main__":
    main()
