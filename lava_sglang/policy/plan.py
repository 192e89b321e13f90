"""The compression plan: which positions every (layer, KV head) keeps.

`compress_plan` is the one entry point the benchmarks, the SGLang plugin and outside users
call. `PlanBuilder` is its streaming form for prefill, layer by layer (the plugin feeds it
statistics as each layer's attention runs, or scores made by the Triton kernel), and gives
the same plan: `compress_plan` is implemented with it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from lava_sglang.policy.base import LayerScores, Policy
from lava_sglang.policy.registry import make_policy


@dataclass(frozen=True)
class CompressionPlan:
    """Positions kept per (layer, KV head), with the budgets that produced them.

    kept[layer][kv_head]: 1-D int64 positions in ascending order, the window included.
    layer_budgets[layer]: selectable (non-window) tokens per KV head the layer was given.
    head_budgets[layer][kv_head]: selectable tokens that head keeps.
    layer_entropy[layer]: normalised entropy of the layer's scores (nan when not scored).
    """

    policy: str
    seq_len: int
    window: int
    budget_tokens: int
    kept: list[list[torch.Tensor]]
    layer_budgets: list[int]
    head_budgets: list[list[int]]
    layer_entropy: list[float]

    @property
    def num_layers(self) -> int:
        return len(self.kept)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kept[0])

    def kept_lengths(self) -> torch.Tensor:
        """[layers, kv_heads] int64: rows each (layer, KV head) keeps."""
        return torch.tensor([[len(positions) for positions in layer] for layer in self.kept], dtype=torch.int64)

    @property
    def kept_rows(self) -> int:
        """Kept K (or V) rows over all layers and KV heads."""
        return int(self.kept_lengths().sum())

    @property
    def keep_ratio(self) -> float:
        """Kept rows over the rows of the uncompressed cache."""
        return self.kept_rows / (self.num_layers * self.num_kv_heads * self.seq_len)


def resolve_budget(budget: float | int, seq_len: int) -> int:
    """Average tokens kept per layer and KV head (window included), per lava.md.

    A float in (0, 1] is a keep ratio, taken at its decimal value (0.2 of 2000 is 400, not
    401 from binary rounding); an int >= 1 is a token count.
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f"budget must be a float in (0, 1] or an int >= 1, got {budget!r}")
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"budget must be an int >= 1 when given in tokens, got {budget!r}")
        return int(budget)
    ratio = float(budget)
    if not math.isfinite(ratio) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"budget must be a keep ratio in (0, 1] when given as a float, got {budget!r}")
    return math.ceil(Fraction(repr(ratio)) * seq_len)


def _check_tensor(name: str, tensor: object, layer: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name}[{layer}] must be a 3-D tensor, got {shape}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name}[{layer}] contains non-finite values (nan or inf)")
    return tensor


class PlanBuilder:
    """Builds a `CompressionPlan` one layer at a time.

    Layers arrive in order through `add_layer` (raw window queries, keys, values) or
    `add_layer_scores` (statistics computed elsewhere, e.g. by the window-statistics kernel);
    `finish` allocates the budgets once every layer is in.
    """

    def __init__(self, policy: Policy, budget: float | int, *, seq_len: int, num_layers: int, num_kv_heads: int):
        policy.validate()
        for name, value in (("seq_len", seq_len), ("num_layers", num_layers), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.policy = policy
        self.seq_len = seq_len
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.window = min(policy.window, seq_len)
        self.prefix_len = seq_len - self.window
        self.budget_tokens = seq_len if policy.keeps_everything else resolve_budget(budget, seq_len)
        self._layers: list[LayerScores | None] = []
        self._num_q_heads: int | None = None

    @property
    def evicts(self) -> bool:
        """False when the plan keeps everything (budget >= n, n <= w or the full policy)."""
        return self.budget_tokens < self.seq_len and self.prefix_len > 0

    @property
    def needs_queries(self) -> bool:
        """Whether `add_layer` uses the window queries; callers may skip capturing them if not."""
        return self.policy.needs_scores and self.evicts

    def add_layer(self, q_window: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        layer = len(self._layers)
        self._check_room(layer)
        keys = _check_tensor("keys", keys, layer)
        values = _check_tensor("values", values, layer)
        q_window = _check_tensor("q_window", q_window, layer)
        expected = (self.num_kv_heads, self.seq_len)
        if tuple(keys.shape[:2]) != expected:
            raise ValueError(f"keys[{layer}] must be [Hkv={expected[0]}, n={expected[1]}, d], got {tuple(keys.shape)}")
        if tuple(values.shape[:2]) != expected:
            raise ValueError(
                f"values[{layer}] must be [Hkv={expected[0]}, n={expected[1]}, d], got {tuple(values.shape)}"
            )
        num_q_heads, q_len, head_dim = q_window.shape
        if num_q_heads % self.num_kv_heads:
            raise ValueError(f"q_window[{layer}] has Hq={num_q_heads}, not a multiple of Hkv={self.num_kv_heads}")
        if self._num_q_heads not in (None, num_q_heads):
            raise ValueError(f"q_window[{layer}] has Hq={num_q_heads}, earlier layers had {self._num_q_heads}")
        if q_len != self.window or head_dim != keys.shape[2]:
            raise ValueError(
                f"q_window[{layer}] must be [Hq, w={self.window}, d={keys.shape[2]}] "
                f"(w = min(window, n)), got {tuple(q_window.shape)}"
            )
        self._num_q_heads = num_q_heads
        self._layers.append(self.policy.layer_scores(q_window, keys, values) if self.needs_queries else None)

    def add_layer_scores(self, layer_scores: LayerScores) -> None:
        layer = len(self._layers)
        self._check_room(layer)
        expected = (self.num_kv_heads, self.prefix_len)
        if tuple(layer_scores.scores.shape) != expected:
            raise ValueError(f"scores of layer {layer} must be [Hkv, m] = {list(expected)}, "
                             f"got {list(layer_scores.scores.shape)}")
        self._layers.append(layer_scores if self.needs_queries else None)

    def _check_room(self, layer: int) -> None:
        if layer >= self.num_layers:
            raise ValueError(f"got more layers than num_layers={self.num_layers}")

    def finish(self) -> CompressionPlan:
        if len(self._layers) != self.num_layers:
            raise ValueError(f"got {len(self._layers)} layers, expected num_layers={self.num_layers}")
        entropies = [layer.entropy if layer is not None else math.nan for layer in self._layers]
        if not self.evicts:
            everything = torch.arange(self.seq_len)
            return self._plan(
                kept=[[everything] * self.num_kv_heads for _ in range(self.num_layers)],
                layer_budgets=[self.prefix_len] * self.num_layers,
                head_budgets=[[self.prefix_len] * self.num_kv_heads for _ in range(self.num_layers)],
                entropies=entropies,
            )
        selectable = max(self.budget_tokens - self.window, 0)
        layer_budgets = self.policy.layer_budgets(entropies, selectable * self.num_layers, self.prefix_len)
        window_positions = torch.arange(self.prefix_len, self.seq_len)
        kept, head_budgets = [], []
        for layer_budget, layer in zip(layer_budgets, self._layers):
            scores = layer.scores if layer is not None else None
            heads = self.policy.head_budgets(scores, layer_budget) if scores is not None else (
                [layer_budget] * self.num_kv_heads)
            head_budgets.append(heads)
            kept.append([
                torch.sort(torch.cat([
                    self.policy.select(scores[head] if scores is not None else None, budget, self.prefix_len).cpu(),
                    window_positions,
                ])).values
                for head, budget in enumerate(heads)
            ])
        return self._plan(kept=kept, layer_budgets=layer_budgets, head_budgets=head_budgets, entropies=entropies)

    def _plan(self, *, kept, layer_budgets, head_budgets, entropies) -> CompressionPlan:
        return CompressionPlan(
            policy=self.policy.name, seq_len=self.seq_len, window=self.window, budget_tokens=self.budget_tokens,
            kept=kept, layer_budgets=layer_budgets, head_budgets=head_budgets, layer_entropy=entropies,
        )


def compress_plan(
    policy: str | Policy,
    q_window: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    budget: float | int,
    *,
    window: int = 32,
    pool_kernel: int = 7,
    alpha: float = 0.2,
) -> CompressionPlan:
    """Plan which tokens each layer and KV head keeps (lava.md).

    policy: a registered name ("lava", "snapkv", "ada_snapkv", "pyramidkv", "streamingllm",
        "full") or a `Policy` instance (then `window`, `pool_kernel`, `alpha` are its own).
    q_window: per layer, [Hq, w, d] post-RoPE queries of the last w = min(window, n) tokens.
    keys, values: per layer, [Hkv, n, d] post-RoPE keys and the values.
    budget: keep ratio in (0, 1] (float) or average tokens per layer and KV head (int),
        window included.
    Raises ValueError naming the offending argument.
    """
    if not isinstance(policy, Policy):
        policy = make_policy(policy, window=window, pool_kernel=pool_kernel, alpha=alpha)
    lists = {"q_window": q_window, "keys": keys, "values": values}
    for name, value in lists.items():
        if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or len(value) == 0:
            raise ValueError(f"{name} must be a non-empty sequence of per-layer tensors, got {type(value).__name__}")
    lengths = {name: len(value) for name, value in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"q_window, keys and values must have one entry per layer, got {lengths}")
    first_keys = _check_tensor("keys", keys[0], 0)
    builder = PlanBuilder(
        policy, budget, seq_len=first_keys.shape[1], num_layers=len(keys), num_kv_heads=first_keys.shape[0],
    )
    for layer_q, layer_keys, layer_values in zip(q_window, keys, values):
        builder.add_layer(layer_q, layer_keys, layer_values)
    return builder.finish()
