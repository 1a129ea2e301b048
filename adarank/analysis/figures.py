"""PNG figures of the analysis sections (matplotlib, Agg canvas, no pyplot global state).

Each ``plot_*`` function takes the JSON-ready section dict from :mod:`adarank.analysis.sections`
and a path, writes the PNG atomically and returns the path.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from adarank.analysis.naming import module_depth, module_type

__all__ = [
    "short_labels",
    "plot_rank_heatmap",
    "plot_final_ranks",
    "plot_budget",
    "plot_births_deaths",
    "plot_spectra",
    "plot_snapshot_similarity",
    "plot_similarity_grids",
    "plot_delta_vs_w",
    "plot_module_correlation",
    "MAX_PANELS",
]

#: at most this many per-module panels in a small-multiples figure (all numbers are in the JSON)
MAX_PANELS = 36
_DPI = 110


def short_labels(names: list[str]) -> list[str]:
    """Compact labels: ``<depth>.<type>`` (``3.query``) where that pair is unique, else the name
    without the dotted prefix common to all names (``pooler.dense``)."""
    if not names:
        return []
    split = [n.split(".") for n in names]
    k = 0
    while all(len(s) > k + 1 for s in split) and len({s[k] for s in split}) == 1:
        k += 1
    stripped = [".".join(s[k:]) for s in split]
    compact = [
        None if module_depth(n) is None else f"{module_depth(n)}.{module_type(n)}" for n in names
    ]
    counts = Counter(compact)
    return [c if c is not None and counts[c] == 1 else s for c, s in zip(compact, stripped)]


def _new(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _matrix(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def _label_size(n: int) -> float:
    return max(4.0, min(9.0, 300.0 / max(n, 1)))


def plot_rank_heatmap(evo: dict, path: str | os.PathLike) -> Path:
    """Rank of every module (rows) at every logged step (columns)."""
    ranks = _matrix(evo["ranks"])
    steps = evo["steps"]
    fig = _new(10, max(3.0, 0.18 * len(evo["layers"]) + 1.5))
    ax = fig.add_subplot()
    im = ax.imshow(
        np.ma.masked_invalid(ranks), aspect="auto", interpolation="nearest", cmap="viridis"
    )
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 10)).astype(int))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_yticks(
        range(len(evo["layers"])),
        short_labels(evo["layers"]),
        fontsize=_label_size(len(evo["layers"])),
    )
    ax.set_xlabel("optimizer step")
    ax.set_title("rank per module over training")
    fig.colorbar(im, ax=ax, label="live rank")
    return _save(fig, path)


def plot_final_ranks(evo: dict, path: str | os.PathLike) -> Path:
    """Final rank by module type × depth (heatmap) and mean final rank per type and per depth."""
    final, types, depths = evo["final_ranks"], evo["module_types"], evo["depths"]
    order = evo["type_order"]
    depth_values = sorted({d for d in depths.values() if d is not None})
    fig = _new(13, 4.2)
    ax0, ax1, ax2 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [2, 1, 1.4]})
    if depth_values:
        grid = np.full((len(order), len(depth_values)), np.nan)
        for t_i, t in enumerate(order):
            for d_i, d in enumerate(depth_values):
                vals = [final[n] for n in final if types[n] == t and depths[n] == d]
                if vals:
                    grid[t_i, d_i] = float(np.mean(vals))
        im = ax0.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis")
        for (t_i, d_i), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax0.text(
                    d_i,
                    t_i,
                    f"{v:.0f}" if v == int(v) else f"{v:.1f}",
                    ha="center",
                    va="center",
                    color="w",
                    fontsize=7,
                )
        ax0.set_xticks(range(len(depth_values)), [str(d) for d in depth_values])
        ax0.set_yticks(range(len(order)), order)
        ax0.set_xlabel("layer (depth)")
        fig.colorbar(im, ax=ax0, label="final rank")
    else:
        ax0.text(
            0.5, 0.5, "no layer index in the module names", ha="center", transform=ax0.transAxes
        )
    ax0.set_title("final rank by type and depth")
    by_type = evo["by_type"]
    ax1.bar(range(len(order)), [by_type[t]["mean"] for t in order], color="tab:blue")
    ax1.set_xticks(range(len(order)), order, rotation=45, ha="right")
    ax1.set_ylabel("mean final rank")
    ax1.set_title("by type")
    by_depth = evo["by_depth"]
    keys = list(by_depth)
    ax2.bar(range(len(keys)), [by_depth[k]["mean"] for k in keys], color="tab:orange")
    ax2.set_xticks(range(len(keys)), keys)
    ax2.set_xlabel("layer (depth)")
    ax2.set_title("by depth")
    fig.tight_layout()
    return _save(fig, path)


def plot_budget(evo: dict, path: str | os.PathLike) -> Path:
    """Budget target and live adapter parameters at each allocation event."""
    b = evo["budget"]
    fig = _new(8, 3.6)
    ax = fig.add_subplot()
    if b["steps"]:
        ax.plot(b["steps"], b["target_params"], "-", label="target (budget schedule)")
        ax.plot(b["steps"], b["live_params"], "o-", ms=3, label="live parameters")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no allocation events in budget.csv", ha="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("adapter parameters")
    ax.set_title("parameter budget: target vs live")
    return _save(fig, path)


def plot_births_deaths(evo: dict, path: str | os.PathLike) -> Path:
    """Triplets grown (up) and pruned (down) at each allocation event."""
    b = evo["budget"]
    fig = _new(8, 3.6)
    ax = fig.add_subplot()
    if b["steps"]:
        x = np.arange(len(b["steps"]))
        ax.bar(x, b["grown"], color="tab:green", label="grown (births)")
        ax.bar(x, -np.asarray(b["pruned"]), color="tab:red", label="pruned (deaths)")
        ticks = np.unique(np.linspace(0, len(x) - 1, min(len(x), 12)).astype(int))
        ax.set_xticks(ticks, [str(b["steps"][t]) for t in ticks])
        ax.axhline(0, color="k", lw=0.5)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no allocation events in budget.csv", ha="center", transform=ax.transAxes)
    ax.set_xlabel("allocation event (optimizer step)")
    ax.set_ylabel("triplets")
    ax.set_title("births and deaths of triplets")
    return _save(fig, path)


def plot_spectra(spectra: dict, types: dict[str, str], path: str | os.PathLike) -> Path:
    """Normalised singular values σ_i/σ_1 of every ΔW and the effective ranks per module."""
    names = list(spectra)
    fig = _new(13, max(4.0, 0.16 * len(names) + 1.5))
    ax0, ax1 = fig.subplots(1, 2)
    palette = {t: f"C{k}" for k, t in enumerate(sorted(set(types.values())))}
    seen = set()
    for n in names:
        s = spectra[n]["normalized"]
        if s:
            t = types[n]
            ax0.plot(
                range(1, len(s) + 1),
                s,
                "-",
                color=palette[t],
                alpha=0.6,
                lw=1,
                label=None if t in seen else t,
            )
            seen.add(t)
    ax0.set_yscale("log")
    ax0.set_xlabel("index i")
    ax0.set_ylabel("σ_i / σ_1")
    ax0.set_title("normalised spectra of ΔW")
    if seen:
        ax0.legend(fontsize=7)
    y = np.arange(len(names))
    ax1.barh(y - 0.27, [spectra[n]["numerical_rank"] for n in names], 0.27, label="rank")
    ax1.barh(
        y, [spectra[n]["effective_rank"] for n in names], 0.27, label="effective rank (entropy)"
    )
    ax1.barh(y + 0.27, [spectra[n]["rank_90"] for n in names], 0.27, label="rank for 90% energy")
    ax1.set_yticks(y, short_labels(names), fontsize=_label_size(len(names)))
    ax1.invert_yaxis()
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=3)
    ax1.set_title("rank measures per module")
    fig.tight_layout()
    return _save(fig, path)


def plot_snapshot_similarity(snap: dict, path: str | os.PathLike) -> Path:
    """φ(snapshot at step t, final adapter) for every module (rows) and snapshot (columns)."""
    names = list(snap["vs_final"])
    m = _matrix([snap["vs_final"][n] for n in names])
    fig = _new(9, max(3.0, 0.18 * len(names) + 1.5))
    ax = fig.add_subplot()
    im = ax.imshow(
        np.ma.masked_invalid(m),
        aspect="auto",
        vmin=0,
        vmax=1,
        cmap="magma",
        interpolation="nearest",
    )
    steps = snap["steps"]
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 10)).astype(int))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_yticks(range(len(names)), short_labels(names), fontsize=_label_size(len(names)))
    ax.set_xlabel("snapshot step")
    ax.set_title("subspace similarity φ(snapshot, final) at full ranks")
    fig.colorbar(im, ax=ax, label="φ")
    return _save(fig, path)


def plot_similarity_grids(
    grids: dict, path: str | os.PathLike, title: str, xlabel: str, ylabel: str
) -> Path:
    """Small multiples of φ(A1, A2, i, j) grids (at most :data:`MAX_PANELS` modules)."""
    names = [n for n, g in grids.items() if g is not None][:MAX_PANELS]
    cols = max(1, min(6, len(names)))
    rows = max(1, int(np.ceil(len(names) / cols)))
    fig = _new(2.3 * cols + 1, 2.1 * rows + 0.8)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    labels = short_labels(names) if names else []
    im = None
    for ax, n, lab in zip(axes, names, labels):
        g = np.asarray(grids[n]["grid"])
        im = ax.imshow(
            g,
            origin="lower",
            vmin=0,
            vmax=1,
            cmap="magma",
            aspect="auto",
            extent=(0.5, g.shape[1] + 0.5, 0.5, g.shape[0] + 0.5),
        )
        ax.set_title(lab, fontsize=7)
        # only the largest index as a tick: the grid size is the information, labels are costly
        ax.set_xticks([g.shape[1]], [str(g.shape[1])], fontsize=6)
        ax.set_yticks([g.shape[0]], [str(g.shape[0])], fontsize=6)
    for ax in axes[len(names) :]:
        ax.axis("off")
    if not names:
        axes[0].text(
            0.5,
            0.5,
            "no module with a non-zero ΔW on both sides",
            ha="center",
            transform=axes[0].transAxes,
        )
    fig.suptitle(f"{title}  (x: {xlabel} j, y: {ylabel} i)", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes.tolist(), label="φ(A1, A2, i, j)", shrink=0.6)
    return _save(fig, path)


def plot_delta_vs_w(dvw: dict, path: str | os.PathLike) -> Path:
    """‖UᵀWVᵀ‖_F for ΔW's, W's top and random directions, and the amplification factor."""
    names = [n for n, m in dvw["modules"].items() if m["rank"]]
    fig = _new(13, max(4.0, 0.16 * len(names) + 1.5))
    ax0, ax1 = fig.subplots(1, 2)
    y = np.arange(len(names))
    mods = dvw["modules"]
    for k, (key, lab) in enumerate(
        [
            ("proj_delta_dirs", "ΔW directions"),
            ("proj_w_dirs", "W top-r directions"),
            ("proj_random_dirs", "random directions"),
        ]
    ):
        ax0.barh(y + (k - 1) * 0.27, [mods[n][key] for n in names], 0.27, label=lab)
    ax0.set_xscale("log")  # ΔW and random directions are often orders of magnitude below W's
    ax0.xaxis.set_minor_formatter(NullFormatter())
    ax0.set_yticks(y, short_labels(names), fontsize=_label_size(len(names)))
    ax0.invert_yaxis()
    ax0.set_xlabel("‖Uᵀ W Vᵀ‖_F (log scale)")
    ax0.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    ax0.set_title("W projected on r-dim directions")
    amp = [mods[n]["amplification"] or 0.0 for n in names]
    ax1.barh(y, amp, color="tab:purple")
    ax1.set_yticks(y, short_labels(names), fontsize=_label_size(len(names)))
    ax1.invert_yaxis()
    ax1.set_xlabel("‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F")
    ax1.set_title("amplification factor")
    fig.tight_layout()
    return _save(fig, path)


def plot_module_correlation(corr: dict, path: str | os.PathLike) -> Path:
    """Module × module φ between right-singular subspaces (blank: different d_in or ΔW = 0)."""
    names = corr["layers"]
    m = _matrix(corr["matrix"])
    size = max(4.5, 0.18 * len(names) + 2)
    fig = _new(size + 1, size)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(m), vmin=0, vmax=1, cmap="magma", interpolation="nearest")
    labels = short_labels(names)
    fs = _label_size(len(names))
    ax.set_xticks(range(len(names)), labels, rotation=90, fontsize=fs)
    ax.set_yticks(range(len(names)), labels, fontsize=fs)
    ax.set_title("module correlation: φ of input subspaces")
    fig.colorbar(im, ax=ax, label="φ", shrink=0.8)
    return _save(fig, path)
