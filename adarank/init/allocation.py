r"""Data-informed starting ranks: spend the initial parameter budget where the spectra say.

Each layer offers its calibration spectrum as candidate triplets, one per direction:

* ``covariance`` signal — the explained-variance ratio ``e_i / Σ_j e_j`` of the layer's input
  second moment (EVA, Paischer et al. 2024, §3.3: ranks redistributed by explained variance);
* ``gradient`` signal — the gradient energy ``σ_i²`` of ``G = Σ δ xᵀ``, normalised by the total
  over all layers (comparable across layers: it is the squared first-order loss decrease).

A direction of layer ℓ costs ``d_in + d_out + 1`` parameters. We take directions greedily by
**energy per parameter** under the budget with per-layer ``min_rank``/``max_rank`` bounds — the
cost-aware greedy of :func:`adarank.allocation.allocate` (one place for that rule). Since every
layer's spectrum is sorted, the chosen set of a layer is its leading directions and only the
count (the starting rank) matters.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adarank.allocation.allocator import allocate

__all__ = ["ALLOCATION_SIGNALS", "normalized_energies", "starting_ranks"]

ALLOCATION_SIGNALS = ("covariance", "gradient")


def normalized_energies(
    spectra: Mapping[str, torch.Tensor], signal: str
) -> dict[str, torch.Tensor]:
    """Per-direction energies, descending, normalised as the ``signal`` requires.

    Args:
        spectra: layer → eigenvalues of the input second moment (``covariance``) or singular
            values of the accumulated gradient (``gradient``).
        signal: "covariance" or "gradient".
    """
    if signal not in ALLOCATION_SIGNALS:
        raise ValueError(f"allocation signal {signal!r} is not one of {list(ALLOCATION_SIGNALS)}")
    out: dict[str, torch.Tensor] = {}
    if signal == "covariance":
        for n, s in spectra.items():
            s = s.detach().double().cpu().clamp_min(0).sort(descending=True).values
            total = float(s.sum())
            out[n] = s / total if total > 0 else torch.zeros_like(s)
        return out
    energies = {
        n: s.detach().double().cpu().abs().sort(descending=True).values ** 2
        for n, s in spectra.items()
    }
    total = sum(float(e.sum()) for e in energies.values())
    return {n: (e / total if total > 0 else torch.zeros_like(e)) for n, e in energies.items()}


def starting_ranks(
    energies: Mapping[str, torch.Tensor],
    costs: Mapping[str, int],
    budget: int,
    *,
    min_rank: int | Mapping[str, int] = 0,
    max_rank: int | Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Initial rank of every layer under a parameter budget.

    Args:
        energies: layer → per-direction energies (any order; see :func:`normalized_energies`).
        costs: layer → triplet cost ``d_in + d_out + 1``.
        budget: initial parameter budget (sum of ``rank × cost`` stays ≤ budget, except that
            ``min_rank`` is always honoured).
        min_rank: per-layer lower bound (int or mapping).
        max_rank: per-layer upper bound (int or mapping), e.g. each layer's capacity.

    Returns:
        layer → starting rank.

    Raises:
        ValueError: a negative budget, missing costs, or ``min_rank`` alone over the budget.
    """
    if int(budget) < 0:
        raise ValueError(f"init_budget={budget} must be a non-negative number of parameters")
    missing = sorted(set(energies) - set(costs))
    if missing:
        raise ValueError(f"no triplet cost given for layers {missing}")
    forced = sum(
        min(int(min_rank.get(n, 0) if isinstance(min_rank, Mapping) else min_rank), e.numel())
        * int(costs[n])
        for n, e in energies.items()
    )
    if forced > budget:
        raise ValueError(
            f"min_rank alone needs {forced} parameters, more than init_budget={budget}; lower "
            "min_rank or raise the budget"
        )
    plan = allocate(
        {n: e.detach().double() for n, e in energies.items()},
        {n: int(c) for n, c in costs.items() if n in energies},
        int(budget),
        min_rank=min_rank,
        max_rank=max_rank,
    )
    return {n: plan.rank(n) for n in energies}
