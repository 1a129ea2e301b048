"""Global, cost-aware choice of the live triplets under a parameter budget.

Each layer offers *items*: its live triplets and (optionally) growth candidates, each with a
score and the layer's triplet cost ``d_in + d_out + 1``. We maximise the total score under the
budget with the greedy rule of the fractional knapsack: items are taken in decreasing
**score per parameter**; an item that no longer fits is skipped and cheaper ones are still
tried, so the result ends within one triplet's cost of the budget whenever enough items exist.

Constraints: per-layer ``min_rank`` (the layer's best items are forced), ``max_rank``, and
``forced`` items (e.g. freshly grown triplets under protection). Ties in score per parameter
are broken deterministically: cheaper layer first, then layer name, then item index.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["allocate", "AllocationPlan"]


@dataclass
class AllocationPlan:
    """Selected item indices per layer, and the parameters they cost."""

    selected: dict[str, torch.Tensor]  # layer → sorted LongTensor of item indices
    params: int
    budget: int

    def rank(self, name: str) -> int:
        return int(self.selected[name].numel())


def _bound(value: int | Mapping[str, int] | None, name: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, Mapping):
        return int(value.get(name, default))
    return int(value)


def allocate(
    scores: Mapping[str, torch.Tensor],
    costs: Mapping[str, int],
    budget: int,
    min_rank: int | Mapping[str, int] | None = 0,
    max_rank: int | Mapping[str, int] | None = None,
    forced: Mapping[str, torch.Tensor] | None = None,
) -> AllocationPlan:
    """Choose items maximising total score subject to Σ cost ≤ ``budget``.

    Args:
        scores: layer → 1-D tensor of item scores (non-negative; NaN is treated as 0).
        costs: layer → parameters per item of that layer.
        budget: parameter budget.
        min_rank: per-layer minimum number of items (int or mapping), default 0.
        max_rank: per-layer maximum number of items (int or mapping), default: all items.
        forced: layer → bool mask of items that must be kept (when they fit in max_rank).

    Returns:
        an :class:`AllocationPlan`. If the forced items alone exceed the budget, forcing by
        ``forced`` is dropped (min_rank is kept; the schedule validates that it fits).
    """
    if budget < 0:
        raise ValueError(f"budget={budget} must be non-negative")
    names = sorted(scores)
    missing = [n for n in names if n not in costs]
    if missing:
        raise ValueError(f"no cost given for layers {missing}")
    clean = {
        n: torch.nan_to_num(scores[n].detach().double().cpu(), nan=0.0).clamp_min(0) for n in names
    }
    lo = {n: min(_bound(min_rank, n, 0), clean[n].numel()) for n in names}
    hi = {n: min(_bound(max_rank, n, clean[n].numel()), clean[n].numel()) for n in names}
    for n in names:
        if lo[n] > hi[n]:
            raise ValueError(f"layer {n!r}: min_rank {lo[n]} exceeds max_rank {hi[n]}")

    def forced_items(use_forced: bool) -> dict[str, list[int]]:
        out = {}
        for n in names:
            order = sorted(range(clean[n].numel()), key=lambda i: (-float(clean[n][i]), i))
            chosen = order[: lo[n]]
            if use_forced and forced is not None and n in forced:
                extra = [i for i in order if bool(forced[n][i]) and i not in chosen]
                chosen += extra[: max(0, hi[n] - len(chosen))]
            out[n] = chosen
        return out

    base = forced_items(True)
    if sum(len(v) * costs[n] for n, v in base.items()) > budget:
        base = forced_items(False)
    used = sum(len(v) * costs[n] for n, v in base.items())
    chosen = {n: set(v) for n, v in base.items()}
    pool = [
        (-float(clean[n][i]) / costs[n], costs[n], n, i)
        for n in names
        for i in range(clean[n].numel())
        if i not in chosen[n]
    ]
    pool.sort()
    min_cost = min((costs[n] for n in names), default=0)
    for _, cost, n, i in pool:
        if budget - used < min_cost:
            break
        if len(chosen[n]) >= hi[n] or used + cost > budget:
            continue
        chosen[n].add(i)
        used += cost
    selected = {n: torch.tensor(sorted(chosen[n]), dtype=torch.long) for n in names}
    return AllocationPlan(selected=selected, params=used, budget=budget)
