"""Rank-trajectory files: ``ranks.csv``, ``budget.csv`` and ``rank_heatmap.png``.

Records are plain dicts with the fields of ``adarank.allocation.AllocationEvent``
(``step, target_params, live_params, ranks, pruned, grown, score_summary``); see
:func:`event_record`. Every file is written to a temporary file in the same directory and moved
into place with ``os.replace``, so a crash never leaves a half-written file; the heatmap can be
re-rendered from ``ranks.csv`` alone (:func:`render_heatmap_from_csv`).

File formats::

    ranks.csv    step,layer,rank                                   one row per (event, layer)
    budget.csv   step,target_params,live_params,pruned,grown       one row per event
                 (pruned/grown: triplets removed/added over all layers at that event)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "event_record",
    "rank_matrix",
    "read_ranks_csv",
    "render_heatmap",
    "render_heatmap_from_csv",
    "write_budget_csv",
    "write_ranks_csv",
]

RANKS_CSV = "ranks.csv"
BUDGET_CSV = "budget.csv"
HEATMAP_PNG = "rank_heatmap.png"


def event_record(event: Any) -> dict:
    """Normalise an ``AllocationEvent`` (or an equivalent dict) to a JSON-friendly dict."""
    if isinstance(event, dict):
        raw = event
    elif hasattr(event, "to_dict"):
        raw = event.to_dict()
    elif dataclasses.is_dataclass(event):
        raw = dataclasses.asdict(event)
    else:
        raise TypeError(f"cannot read an allocation event from {type(event).__name__}")
    missing = {"step", "target_params", "live_params", "ranks"} - set(raw)
    if missing:
        raise ValueError(f"allocation event is missing fields {sorted(missing)}")
    return {
        "step": int(raw["step"]),
        "target_params": int(raw["target_params"]),
        "live_params": int(raw["live_params"]),
        "ranks": {str(k): int(v) for k, v in raw["ranks"].items()},
        "pruned": {str(k): int(v) for k, v in (raw.get("pruned") or {}).items()},
        "grown": {str(k): int(v) for k, v in (raw.get("grown") or {}).items()},
        "score_summary": {str(k): float(v) for k, v in (raw.get("score_summary") or {}).items()},
    }


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def write_ranks_csv(path: str | os.PathLike, history: Sequence[dict]) -> Path:
    """Write ``step,layer,rank`` rows for every event (layers in the event's order)."""
    rows = [(e["step"], name, r) for e in history for name, r in e["ranks"].items()]
    _atomic_write(Path(path), _csv_bytes(("step", "layer", "rank"), rows))
    return Path(path)


def write_budget_csv(path: str | os.PathLike, history: Sequence[dict]) -> Path:
    """Write ``step,target_params,live_params,pruned,grown`` rows (totals over layers)."""
    rows = [
        (
            e["step"],
            e["target_params"],
            e["live_params"],
            sum(e["pruned"].values()),
            sum(e["grown"].values()),
        )
        for e in history
    ]
    header = ("step", "target_params", "live_params", "pruned", "grown")
    _atomic_write(Path(path), _csv_bytes(header, rows))
    return Path(path)


def read_ranks_csv(path: str | os.PathLike) -> list[dict]:
    """Read ``ranks.csv`` back into records with ``step`` and ``ranks`` (in file order)."""
    by_step: dict[int, dict[str, int]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            by_step.setdefault(int(row["step"]), {})[row["layer"]] = int(row["rank"])
    return [{"step": s, "ranks": r} for s, r in by_step.items()]


def rank_matrix(history: Sequence[dict]) -> tuple[list[str], list[int], list[list[int]]]:
    """``(layers, steps, matrix)`` with ``matrix[i][j]`` = rank of layer i after event j."""
    layers: list[str] = []
    for e in history:
        layers += [n for n in e["ranks"] if n not in layers]
    steps = [e["step"] for e in history]
    matrix = [[e["ranks"].get(n, 0) for e in history] for n in layers]
    return layers, steps, matrix


def render_heatmap(path: str | os.PathLike, history: Sequence[dict], title: str = "") -> Path:
    """Render a modules × steps heatmap of the ranks to a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    layers, steps, matrix = rank_matrix(history)
    height = min(2.0 + 0.22 * max(1, len(layers)), 40.0)
    fig = Figure(figsize=(max(6.0, min(0.25 * len(steps) + 4.0, 24.0)), height))
    ax = fig.add_subplot(1, 1, 1)
    if layers:
        im = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis")
        fig.colorbar(im, ax=ax, label="rank")
        ax.set_yticks(range(len(layers)), labels=layers, fontsize=max(4, 9 - len(layers) // 20))
        ticks = sorted({0, len(steps) - 1, *range(0, len(steps), max(1, len(steps) // 10))})
        ax.set_xticks(ticks, labels=[str(steps[j]) for j in ticks])
    else:
        ax.text(0.5, 0.5, "no allocation events", ha="center", va="center")
    ax.set_xlabel("optimizer step (allocation events)")
    ax.set_title(title or "adapter rank per module")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _atomic_write(Path(path), buf.getvalue())
    return Path(path)


def render_heatmap_from_csv(ranks_csv: str | os.PathLike, png: str | os.PathLike) -> Path:
    """Re-render ``rank_heatmap.png`` from ``ranks.csv`` (e.g. after a crash)."""
    return render_heatmap(png, read_ranks_csv(ranks_csv))
