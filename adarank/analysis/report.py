"""``report.md``: the analysis figures with one-line explanations and headline numbers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from adarank.modules.adapter_io import _atomic_write

__all__ = ["write_report"]


def _fmt(v: float | int | None, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}g}"


def _figure(lines: list[str], data: dict, key: str, caption: str) -> None:
    name = data["figures"].get(key)
    if name:
        lines += [f"![{key}]({name})", "", f"*{caption}*", ""]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def write_report(data: dict, path: str | os.PathLike) -> Path:
    """Render ``data`` (the content of ``analysis.json``) as Markdown next to the figures."""
    evo = data["rank_evolution"]
    s = data.get("summary") or {}
    lines = [f"# adarank analysis of `{data['run_dir']}`", ""]
    facts = [
        f"{len(data['layers'])} adapted modules",
        f"final total rank {evo['total_final_rank']}",
        f"{evo['final_params']:,} adapter parameters",
        f"{evo['allocation_events']} allocation events",
    ]
    if "param_budget" in s:
        facts.append(
            f"budget {s['param_budget']:,}"
            if isinstance(s["param_budget"], int)
            else f"budget {s['param_budget']}"
        )
    lines += [", ".join(facts) + ".", "", "All numbers are in `analysis.json`.", ""]

    lines += ["## 1. Rank evolution", ""]
    _figure(
        lines,
        data,
        "rank_heatmap",
        "Live rank of every module (rows) at each logged step: where the budget went over time.",
    )
    _figure(
        lines,
        data,
        "final_ranks",
        "Final rank by module type and depth: which kinds of matrices and layers needed capacity.",
    )
    lines += _table(
        ["type", "modules", "mean rank", "min", "max", "total"],
        [
            [t, str(g["modules"]), _fmt(g["mean"]), str(g["min"]), str(g["max"]), str(g["total"])]
            for t, g in evo["by_type"].items()
        ],
    )
    _figure(
        lines,
        data,
        "budget",
        "Budget schedule target vs live adapter parameters at each allocation event.",
    )
    _figure(
        lines,
        data,
        "births_deaths",
        f"Triplets grown (births, {evo['births_total']} in total) and pruned (deaths, {evo['deaths_total']}) per allocation event.",
    )
    if evo["csv_final_mismatch"]:
        lines += [
            f"Note: the last ranks in ranks.csv differ from adapter/ for {evo['csv_final_mismatch'][:5]}.",
            "",
        ]

    sp = data["spectra"]
    lines += ["## 2. Spectra of ΔW", ""]
    _figure(
        lines,
        data,
        "spectra",
        "Singular values of ΔW = scaling·P·diag(λ)·Q divided by the largest, and three rank measures: a fast decay means fewer directions matter than the live rank suggests.",
    )
    lines += [
        f"Mean effective rank (entropy, Roy & Vetterli 2007) {_fmt(_mean([v['effective_rank'] for v in sp.values()]))}, "
        f"mean rank for 90% of the energy {_fmt(_mean([v['rank_90'] for v in sp.values()]))}, "
        f"mean live rank {_fmt(_mean([v['numerical_rank'] for v in sp.values()]))}.",
        "",
    ]

    lines += ["## 3. Subspace similarity", ""]
    lines += [
        "φ(A1, A2, i, j) = ‖U_iᵀ U_j‖_F² / min(i, j) between the top-i and top-j right-singular vectors of two updates (LoRA paper Section 7.2): 1 = one subspace contains the other, random subspaces give about max(i, j)/d_in.",
        "",
    ]
    snap = data["subspace_similarity"]["snapshots"]
    if snap["available"]:
        _figure(
            lines,
            data,
            "snapshot_similarity",
            "φ between each snapshot's update and the final update at full ranks: when each module's directions settled.",
        )
        _figure(
            lines,
            data,
            "snapshot_grids",
            f"φ grids between the snapshot at step {snap['grid_steps'][0]} (rows i) and the final adapter (columns j), per module.",
        )
    else:
        lines += [f"No within-run comparison: {snap['reason']}.", ""]
    against = data["subspace_similarity"]["against"]
    if against is not None:
        grids = [g for g in against["grids"].values() if g is not None]
        _figure(
            lines,
            data,
            "against_grids",
            f"φ grids between this run (rows i) and `{against['run_dir']}` (columns j), per module.",
        )
        lines += [
            f"Mean φ at full ranks {_fmt(_mean([g['phi_full'] for g in grids]))} vs a random baseline of "
            f"{_fmt(_mean([g['random_baseline'] for g in grids]))}.",
            "",
        ]
    else:
        lines += ["No between-run comparison (use `--against OTHER_RUN_DIR`).", ""]

    dvw = data["delta_vs_w"]
    lines += ["## 4. ΔW vs W", ""]
    if dvw["available"]:
        _figure(
            lines,
            data,
            "delta_vs_w",
            "‖UᵀWVᵀ‖_F of the pre-trained W on ΔW's own r directions, W's top-r directions and random ones, and the amplification factor ‖ΔW‖_F / ‖UᵀWVᵀ‖_F (LoRA Section 7.3): a large factor means ΔW amplifies directions W under-emphasises.",
        )
        mods = [m for m in dvw["modules"].values() if m["rank"]]
        lines += [
            f"W from {dvw['source']}. Mean amplification {_fmt(_mean([m['amplification'] for m in mods]))}; "
            f"mean ‖UᵀWVᵀ‖_F: ΔW directions {_fmt(_mean([m['proj_delta_dirs'] for m in mods]))}, "
            f"W directions {_fmt(_mean([m['proj_w_dirs'] for m in mods]))}, random "
            f"{_fmt(_mean([m['proj_random_dirs'] for m in mods]))}.",
            "",
        ]
    else:
        lines += [f"Skipped: {dvw['reason']}.", ""]

    corr = data["module_correlation"]
    pairs = [
        (v, b)
        for a, row in enumerate(corr["matrix"])
        for c, (v, b) in enumerate(zip(row, corr["random_baseline"][a]))
        if c > a and v is not None
    ]
    lines += ["## 5. Module correlation", ""]
    _figure(
        lines,
        data,
        "module_correlation",
        "φ between the input (right-singular) subspaces of the updates of two modules with the same input dimension: high values mean modules adapted to the same input directions.",
    )
    if pairs:
        lines += [
            f"{len(pairs)} module pairs share an input dimension: mean φ "
            f"{_fmt(_mean([v for v, _ in pairs]))} vs a random baseline of "
            f"{_fmt(_mean([b for _, b in pairs]))}.",
            "",
        ]

    path = Path(path)
    _atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines)))
    return path
