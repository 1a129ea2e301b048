"""Read the files of a finished run directory for analysis (no model, no re-training).

Layout (docs/architecture.md, "run directory")::

    ranks.csv  step,layer,rank          budget.csv  step,target_params,live_params,pruned,grown
    summary.json  config.yaml  adapter/  snapshots/step_XXXXXXX/  [base_weights.safetensors]

Every problem with the inputs raises :class:`AnalysisInputError` (a ``ValueError``) naming the
file and what was expected; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from adarank.modules.adapter_io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config

__all__ = [
    "AnalysisInputError",
    "AdapterFactors",
    "RankHistory",
    "BudgetHistory",
    "read_adapter",
    "read_ranks_csv",
    "read_budget_csv",
    "list_snapshots",
    "read_summary",
    "BASE_WEIGHTS_NAME",
]

BASE_WEIGHTS_NAME = "base_weights.safetensors"
_SNAPSHOT_RE = re.compile(r"^step_(\d+)$")


class AnalysisInputError(ValueError):
    """A run directory (or a file in it) is missing, empty or incompatible."""


@dataclass
class AdapterFactors:
    """The triplets of one saved adapter, as float64 numpy arrays.

    Attributes:
        path: the adapter directory.
        layers: ``{name: {"P": (d_out, r), "lambda": (r,), "Q": (r, d_in), "scaling": float,
            "d_in": int, "d_out": int, "rank": int}}`` in file order.
    """

    path: Path
    layers: dict[str, dict] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.layers)


def read_adapter(directory: str | os.PathLike) -> AdapterFactors:
    """Read ``adapter_config.json`` + ``adapter.safetensors`` from an adapter directory.

    Raises:
        AnalysisInputError: missing directory or files, a foreign/truncated file, missing tensors
            or shapes that disagree with the config.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AnalysisInputError(
            f"adapter directory {str(directory)!r} does not exist (expected {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} written by save_adapter)"
        )
    try:
        config = read_adapter_config(directory)
    except (FileNotFoundError, ValueError) as err:
        raise AnalysisInputError(str(err)) from err
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise AnalysisInputError(f"{weights} is missing")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise AnalysisInputError(f"cannot read {weights} (truncated or corrupt?): {err}") from err
    layers: dict[str, dict] = {}
    for name, c in config.get("layers", {}).items():
        arrays = {}
        for key, short in (("lora_P", "P"), ("lora_lambda", "lambda"), ("lora_Q", "Q")):
            if f"{name}.{key}" not in tensors:
                raise AnalysisInputError(f"{weights} lacks tensor {name}.{key}")
            arrays[short] = tensors[f"{name}.{key}"].astype(np.float64)
            if not np.all(np.isfinite(arrays[short])):
                raise AnalysisInputError(
                    f"{weights}: {name}.{key} contains NaN or inf (did training diverge?)"
                )
        r, d_out, d_in = int(c["rank"]), int(c["d_out"]), int(c["d_in"])
        want = {"P": (d_out, r), "lambda": (r,), "Q": (r, d_in)}
        for short, shape in want.items():
            if arrays[short].shape != shape:
                raise AnalysisInputError(
                    f"{weights}: {name} {short} has shape {arrays[short].shape}, the config "
                    f"says {shape}"
                )
        layers[name] = {
            **arrays,
            "scaling": float(c["scaling"]),
            "d_in": d_in,
            "d_out": d_out,
            "rank": r,
        }
    if not layers:
        raise AnalysisInputError(f"{directory / CONFIG_NAME} lists no adapter layers")
    return AdapterFactors(directory, layers)


@dataclass
class RankHistory:
    """``ranks.csv`` as a dense table.

    Attributes:
        steps: (T,) sorted optimizer steps.
        layers: module names in first-seen order.
        ranks: (L, T) rank of each layer at each step, carried forward where a step lacks a
            layer (NaN before its first row).
    """

    steps: np.ndarray
    layers: list[str]
    ranks: np.ndarray


def _open_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise AnalysisInputError(f"{path} is missing (expected a CSV with columns {list(columns)})")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise AnalysisInputError(
                f"{path} has columns {header}, missing {missing} (expected {list(columns)})"
            )
        return list(reader)


def _num(path: Path, row_no: int, row: dict[str, str], col: str) -> float:
    try:
        return float(row[col])
    except (TypeError, ValueError) as err:
        raise AnalysisInputError(
            f"{path} row {row_no}: column {col!r} is {row[col]!r}, expected a number"
        ) from err


def read_ranks_csv(path: str | os.PathLike) -> RankHistory:
    """Read ``ranks.csv`` (``step,layer,rank``).

    Raises:
        AnalysisInputError: missing file, wrong columns, non-numeric values or no rows.
    """
    path = Path(path)
    rows = _open_csv(path, ("step", "layer", "rank"))
    if not rows:
        raise AnalysisInputError(f"{path} has no rows: the run logged no ranks (did it train?)")
    records = [
        (int(_num(path, i + 2, r, "step")), r["layer"], _num(path, i + 2, r, "rank"))
        for i, r in enumerate(rows)
    ]
    steps = np.array(sorted({s for s, _, _ in records}), dtype=np.int64)
    layers = list(dict.fromkeys(name for _, name, _ in records))
    col = {int(s): k for k, s in enumerate(steps)}
    row = {name: k for k, name in enumerate(layers)}
    table = np.full((len(layers), len(steps)), np.nan)
    for s, name, r in records:
        table[row[name], col[s]] = r
    for k in range(1, len(steps)):  # carry the last known rank forward
        gap = np.isnan(table[:, k])
        table[gap, k] = table[gap, k - 1]
    return RankHistory(steps, layers, table)


@dataclass
class BudgetHistory:
    """``budget.csv`` columns as arrays (one entry per allocation event)."""

    steps: np.ndarray
    target_params: np.ndarray
    live_params: np.ndarray
    pruned: np.ndarray
    grown: np.ndarray


def read_budget_csv(path: str | os.PathLike) -> BudgetHistory:
    """Read ``budget.csv`` (``step,target_params,live_params,pruned,grown``); no rows is allowed."""
    path = Path(path)
    cols = ("step", "target_params", "live_params", "pruned", "grown")
    rows = _open_csv(path, cols)
    data = {
        c: np.array([_num(path, i + 2, r, c) for i, r in enumerate(rows)], dtype=np.float64)
        for c in cols
    }
    order = np.argsort(data["step"], kind="stable")
    data["steps"] = data.pop("step")
    return BudgetHistory(**{c: v[order] for c, v in data.items()})


def list_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of ``snapshots/step_XXXXXXX/`` adapter dirs, sorted by step."""
    root = Path(run_dir) / "snapshots"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _SNAPSHOT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def read_summary(run_dir: str | os.PathLike) -> dict:
    """``summary.json`` as a dict (empty if absent)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AnalysisInputError(f"{path} is not valid JSON ({err})") from err
