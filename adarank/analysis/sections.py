"""The numbers of each analysis section, as JSON-ready dicts (no plotting, no file writing).

Sections follow the LoRA paper (Hu et al. 2021, Section 7) extended to dynamic ranks:
rank evolution, spectra of ΔW, subspace similarity φ (between runs and between snapshots),
ΔW vs W (amplification) and module correlation.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from adarank.analysis.linalg import (
    DeltaSVD,
    delta_svd,
    delta_vs_weight,
    effective_rank,
    energy_rank,
    random_subspace_baseline,
    subspace_similarity,
    subspace_similarity_grid,
)
from adarank.analysis.naming import TYPE_ORDER, display_order, module_depth, module_type
from adarank.analysis.run_files import (
    AdapterFactors,
    AnalysisInputError,
    BudgetHistory,
    RankHistory,
)

__all__ = [
    "adapter_svds",
    "rank_evolution_section",
    "spectra_section",
    "similarity_between",
    "snapshot_section",
    "delta_vs_w_section",
    "module_correlation_section",
]

ENERGY_FRACTION = 0.9


def _r(x: float | None, digits: int = 6) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), digits)


def _rlist(a: np.ndarray, digits: int = 6) -> list:
    return np.round(np.asarray(a, dtype=np.float64), digits).tolist()


def adapter_svds(adapter: AdapterFactors) -> dict[str, DeltaSVD]:
    """Thin SVD of every layer's ΔW, from the factors."""
    return {
        n: delta_svd(c["P"], c["lambda"], c["Q"], c["scaling"]) for n, c in adapter.layers.items()
    }


def _group(values: dict[str, int], key) -> dict[str, dict]:
    groups: dict[str, list[int]] = defaultdict(list)
    for name, v in values.items():
        groups[str(key(name))].append(int(v))
    return {
        g: {
            "modules": len(v),
            "mean": _r(float(np.mean(v)), 3),
            "min": min(v),
            "max": max(v),
            "total": int(sum(v)),
        }
        for g, v in groups.items()
    }


def _depth_key(item: tuple[str, dict]) -> tuple[bool, int]:
    return (not item[0].isdigit(), int(item[0]) if item[0].isdigit() else 0)


def rank_evolution_section(
    history: RankHistory, budget: BudgetHistory, adapter: AdapterFactors
) -> dict:
    """Rank per module over steps, final ranks grouped by type and depth, budget, births/deaths."""
    final = {n: c["rank"] for n, c in adapter.layers.items()}
    types = {n: module_type(n) for n in final}
    depths = {n: module_depth(n) for n in final}
    order = sorted(
        set(types.values()), key=lambda t: (TYPE_ORDER.index(t) if t in TYPE_ORDER else 99, t)
    )
    by_type = _group(final, types.get)
    last_logged = {n: history.ranks[k, -1] for k, n in enumerate(history.layers)}
    mismatched = sorted(n for n in final if n in last_logged and last_logged[n] != final[n])
    rows = display_order(history.layers)
    table = history.ranks[[history.layers.index(n) for n in rows]]
    return {
        "steps": history.steps.tolist(),
        "layers": rows,
        "ranks": [[None if np.isnan(v) else int(v) for v in row] for row in table],
        "final_ranks": final,
        "module_types": types,
        "type_order": order,
        "depths": depths,
        "by_type": {t: by_type[t] for t in order},
        "by_depth": dict(sorted(_group(final, depths.get).items(), key=_depth_key)),
        "total_final_rank": int(sum(final.values())),
        "final_params": int(
            sum(c["rank"] * (c["d_in"] + c["d_out"] + 1) for c in adapter.layers.values())
        ),
        "csv_final_mismatch": mismatched,
        "budget": {
            "steps": budget.steps.astype(int).tolist(),
            "target_params": budget.target_params.astype(int).tolist(),
            "live_params": budget.live_params.astype(int).tolist(),
            "pruned": budget.pruned.astype(int).tolist(),
            "grown": budget.grown.astype(int).tolist(),
        },
        "births_total": int(budget.grown.sum()),
        "deaths_total": int(budget.pruned.sum()),
        "allocation_events": int(budget.steps.size),
    }


def spectra_section(svds: dict[str, DeltaSVD]) -> dict:
    """Per module: singular values of ΔW, normalised by σ₁, energy shares, effective ranks."""
    out = {}
    for name, svd in svds.items():
        s = svd.S
        total = float(np.sum(s**2))
        out[name] = {
            "numerical_rank": svd.rank,
            "singular_values": _rlist(s, 8),
            "normalized": _rlist(s / s[0]) if s.size else [],
            "energy": _rlist(s**2 / total) if total > 0 else [],
            "effective_rank": _r(effective_rank(s), 4),
            "rank_90": energy_rank(s, ENERGY_FRACTION),
            "frobenius": _r(svd.frobenius, 8),
        }
    return out


def similarity_between(a: dict[str, DeltaSVD], b: dict[str, DeltaSVD], names: list[str]) -> dict:
    """φ grids between the right-singular subspaces of the same module in two adapters.

    Returns:
        ``{name: {"i_max", "j_max", "d", "phi_full", "random_baseline", "grid"}}``; ``grid`` is
        ``[i-1][j-1] = φ(A1, A2, i, j)``; modules with a zero ΔW on either side get ``None``.
    """
    out: dict[str, dict | None] = {}
    for name in names:
        va, vb = a[name].Vh.T, b[name].Vh.T  # (d_in, r)
        if va.shape[0] != vb.shape[0]:
            raise AnalysisInputError(
                f"module {name!r}: input dimension d_in={va.shape[0]} vs {vb.shape[0]}; "
                "the adapters come from different base models"
            )
        if va.shape[1] == 0 or vb.shape[1] == 0:
            out[name] = None
            continue
        grid = subspace_similarity_grid(va, vb)
        d = va.shape[0]
        out[name] = {
            "i_max": va.shape[1],
            "j_max": vb.shape[1],
            "d": d,
            "phi_full": _r(float(grid[-1, -1])),
            "random_baseline": _r(random_subspace_baseline(va.shape[1], vb.shape[1], d)),
            "grid": _rlist(grid, 4),
        }
    return out


def snapshot_section(
    snapshots: list[tuple[int, dict[str, DeltaSVD]]], final: dict[str, DeltaSVD]
) -> dict:
    """Within one run: φ of each snapshot vs the final adapter, and grids first-snapshot-vs-final.

    Returns:
        ``steps``, ``vs_final`` (``{name: [φ(snapshot_t, final, r_t, r_final) or None]}``) and
        ``grids`` (:func:`similarity_between` of the earliest snapshot and the final adapter).
    """
    names = list(final)
    if not snapshots:
        return {"available": False, "reason": "no snapshots/step_* directories", "steps": []}
    vs_final: dict[str, list] = {n: [] for n in names}
    for step, svds in snapshots:
        missing = sorted(set(names) - set(svds))
        if missing:
            raise AnalysisInputError(
                f"snapshot at step {step} lacks adapter layers {missing[:5]} of the final adapter"
            )
        for n in names:
            va, vb = svds[n].Vh.T, final[n].Vh.T
            ok = va.shape[1] and vb.shape[1] and va.shape[0] == vb.shape[0]
            vs_final[n].append(_r(subspace_similarity(va, vb)) if ok else None)
    first_step, first = snapshots[0]
    return {
        "available": True,
        "steps": [s for s, _ in snapshots],
        "vs_final": vs_final,
        "grid_steps": [first_step, "final"],
        "grids": similarity_between(first, final, names),
    }


def delta_vs_w_section(
    svds: dict[str, DeltaSVD], weights: dict[str, np.ndarray] | None, source: str, seed: int = 0
) -> dict:
    """‖UᵀWVᵀ‖_F for ΔW's, W's and random directions, and the amplification factor per module."""
    if weights is None:
        return {"available": False, "reason": source, "modules": {}}
    rng = np.random.default_rng(seed)
    modules = {}
    for name, svd in svds.items():
        W = weights[name]
        shape = (svd.U.shape[0], svd.Vh.shape[1])
        if W.shape != shape:
            raise AnalysisInputError(
                f"base weight of {name!r} has shape {W.shape}, the adapter expects (d_out, d_in)="
                f"{shape}"
            )
        modules[name] = {
            k: (_r(v) if isinstance(v, float) else v)
            for k, v in delta_vs_weight(W, svd, rng).items()
        }
    return {"available": True, "source": source, "modules": modules}


def module_correlation_section(svds: dict[str, DeltaSVD]) -> dict:
    """φ between the right-singular (input) subspaces of every pair of modules with equal d_in.

    Entry ``[a][b] = φ(ΔW_a, ΔW_b, r_a, r_b)``; ``None`` where d_in differs or a ΔW is zero.
    """
    names = list(svds)
    n = len(names)
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    baseline: list[list[float | None]] = [[None] * n for _ in range(n)]
    for a in range(n):
        va = svds[names[a]].Vh.T
        for b in range(a, n):
            vb = svds[names[b]].Vh.T
            if va.shape[0] != vb.shape[0] or not va.shape[1] or not vb.shape[1]:
                continue
            phi = _r(subspace_similarity(va, vb))
            base = _r(random_subspace_baseline(va.shape[1], vb.shape[1], va.shape[0]))
            matrix[a][b] = matrix[b][a] = phi
            baseline[a][b] = baseline[b][a] = base
    return {"layers": names, "matrix": matrix, "random_baseline": baseline}
