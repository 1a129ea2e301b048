"""``analyze_run``: read a finished run directory and write ``analysis/`` (JSON, PNGs, report).

Reproduces the LoRA paper's Section 7 analyses (Hu et al. 2021) for adapters whose ranks changed
during training; works from the files only (no re-training, no data).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from adarank.analysis import figures as fig
from adarank.analysis.base_weights import resolve_base_weights
from adarank.analysis.naming import display_order
from adarank.analysis.report import write_report
from adarank.analysis.run_files import (
    AnalysisInputError,
    list_snapshots,
    read_adapter,
    read_budget_csv,
    read_ranks_csv,
    read_summary,
)
from adarank.analysis.sections import (
    adapter_svds,
    delta_vs_w_section,
    module_correlation_section,
    rank_evolution_section,
    similarity_between,
    snapshot_section,
    spectra_section,
)
from adarank.modules.adapter_io import CONFIG_NAME, _atomic_write
from adarank.runs_io import dumps_strict

__all__ = ["AnalysisResult", "analyze_run", "FIGURES"]

#: figure key → file name (the ones that depend on optional inputs may be absent)
FIGURES = {
    "rank_heatmap": "rank_heatmap.png",
    "final_ranks": "final_ranks.png",
    "budget": "budget.png",
    "births_deaths": "births_deaths.png",
    "spectra": "spectra.png",
    "snapshot_similarity": "snapshot_similarity.png",
    "snapshot_grids": "snapshot_grids.png",
    "against_grids": "against_grids.png",
    "delta_vs_w": "delta_vs_w.png",
    "module_correlation": "module_correlation.png",
}


@dataclass
class AnalysisResult:
    """What :func:`analyze_run` wrote: the output folder, every number, figure paths, report."""

    out_dir: Path
    data: dict
    figures: dict[str, Path]
    report: Path


def _adapter_dir(path: Path, role: str) -> Path:
    if (path / CONFIG_NAME).is_file():
        return path  # an adapter directory given directly
    if not path.is_dir():
        raise AnalysisInputError(f"{role} {str(path)!r} does not exist")
    if not (path / "adapter").is_dir():
        raise AnalysisInputError(
            f"{role} {str(path)!r} has no adapter/ directory (did the run finish? expected "
            f"{path / 'adapter' / CONFIG_NAME})"
        )
    return path / "adapter"


def analyze_run(
    run_dir: str | os.PathLike,
    *,
    against: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    base_weights: Mapping[str, object] | None = None,
    model: nn.Module | None = None,
    base_weights_path: str | os.PathLike | None = None,
    wandb: bool = False,
    wandb_project: str = "adarank",
    seed: int = 0,
) -> AnalysisResult:
    """Analyse a finished run directory and write ``analysis.json``, PNG figures and ``report.md``.

    Args:
        run_dir: a run directory written by ``adarank fit`` (see docs/architecture.md).
        against: another run directory (or adapter directory) with the same adapter layers, for
            φ grids between two runs (e.g. two seeds or two budgets).
        out_dir: output folder; default ``run_dir/analysis``.
        base_weights: ``{layer: W (d_out, d_in)}`` pre-trained weights for the ΔW-vs-W section.
        model: alternatively, a model holding the pre-trained weights (with or without adapters).
        base_weights_path: alternatively, a safetensors file (see
            :func:`adarank.analysis.base_weights.save_base_weights`). Without any of these,
            ``run_dir/base_weights.safetensors`` and then ``adarank.runs.load_run`` are tried;
            if all fail the section is skipped with the reason in the report.
        wandb: also log the numbers and figures to Weights & Biases (``WANDB_MODE`` respected,
            offline when unset).
        wandb_project: W&B project name.
        seed: seed for the random-direction baseline.

    Returns:
        an :class:`AnalysisResult`.

    Raises:
        AnalysisInputError: missing or incompatible inputs (no adapter, empty ``ranks.csv``,
            different layer names in ``against`` ...).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalysisInputError(f"run directory {str(run_dir)!r} does not exist")
    adapter = read_adapter(_adapter_dir(run_dir, "run directory"))
    history = read_ranks_csv(run_dir / "ranks.csv")
    budget = read_budget_csv(run_dir / "budget.csv")
    names = display_order(adapter.names)
    adapter.layers = {n: adapter.layers[n] for n in names}
    unknown = sorted(set(history.layers) - set(names))
    if len(unknown) == len(history.layers):
        raise AnalysisInputError(
            f"{run_dir / 'ranks.csv'} names layers {unknown[:3]} ... none of which is in the "
            f"adapter ({names[:3]} ...): ranks.csv and adapter/ come from different runs"
        )
    svds = adapter_svds(adapter)

    snapshots = []
    for step, path in list_snapshots(run_dir):
        snap = read_adapter(path)
        if set(snap.names) != set(names):
            raise AnalysisInputError(
                f"snapshot {path} has layers {sorted(set(snap.names) ^ set(names))[:5]} that "
                "differ from the final adapter"
            )
        snapshots.append((step, adapter_svds(snap)))

    against_data = None
    if against is not None:
        other = read_adapter(_adapter_dir(Path(against), "--against"))
        if set(other.names) != set(names):
            only_a = sorted(set(names) - set(other.names))[:5]
            only_b = sorted(set(other.names) - set(names))[:5]
            raise AnalysisInputError(
                f"--against {str(against)!r} adapts different layers: only in {run_dir}: "
                f"{only_a}, only in {against}: {only_b}"
            )
        against_data = {
            "run_dir": str(against),
            "grids": similarity_between(svds, adapter_svds(other), names),
        }

    weights, source = resolve_base_weights(
        run_dir, names, base_weights=base_weights, model=model, base_weights_path=base_weights_path
    )
    evo = rank_evolution_section(history, budget, adapter)
    data = {
        "run_dir": str(run_dir),
        "summary": read_summary(run_dir),
        "layers": names,
        "rank_evolution": evo,
        "spectra": spectra_section(svds),
        "subspace_similarity": {
            "snapshots": snapshot_section(snapshots, svds),
            "against": against_data,
        },
        "delta_vs_w": delta_vs_w_section(svds, weights, source, seed),
        "module_correlation": module_correlation_section(svds),
        "ranks_csv_layers_not_in_adapter": unknown,
    }

    out = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    figures = _write_figures(data, out)
    data["figures"] = {k: p.name for k, p in figures.items()}
    _atomic_write(
        out / "analysis.json", lambda tmp: Path(tmp).write_text(dumps_strict(data, indent=1))
    )
    report = write_report(data, out / "report.md")
    if wandb:
        from adarank.analysis.wandb_log import log_analysis

        log_analysis(data, figures, out, project=wandb_project)
    return AnalysisResult(out, data, figures, report)


def _write_figures(data: dict, out: Path) -> dict[str, Path]:
    evo = data["rank_evolution"]
    paths = {k: out / v for k, v in FIGURES.items()}
    written = {
        "rank_heatmap": fig.plot_rank_heatmap(evo, paths["rank_heatmap"]),
        "final_ranks": fig.plot_final_ranks(evo, paths["final_ranks"]),
        "budget": fig.plot_budget(evo, paths["budget"]),
        "births_deaths": fig.plot_births_deaths(evo, paths["births_deaths"]),
        "spectra": fig.plot_spectra(data["spectra"], evo["module_types"], paths["spectra"]),
    }
    snap = data["subspace_similarity"]["snapshots"]
    if snap["available"]:
        written["snapshot_similarity"] = fig.plot_snapshot_similarity(
            snap, paths["snapshot_similarity"]
        )
        written["snapshot_grids"] = fig.plot_similarity_grids(
            snap["grids"],
            paths["snapshot_grids"],
            f"φ between the snapshot at step {snap['grid_steps'][0]} and the final adapter",
            "final",
            f"step {snap['grid_steps'][0]}",
        )
    against = data["subspace_similarity"]["against"]
    if against is not None:
        written["against_grids"] = fig.plot_similarity_grids(
            against["grids"],
            paths["against_grids"],
            "φ between this run and --against",
            "--against",
            "this run",
        )
    if data["delta_vs_w"]["available"]:
        written["delta_vs_w"] = fig.plot_delta_vs_w(data["delta_vs_w"], paths["delta_vs_w"])
    written["module_correlation"] = fig.plot_module_correlation(
        data["module_correlation"], paths["module_correlation"]
    )
    for key in set(paths) - set(written):  # drop stale figures from an earlier analysis
        paths[key].unlink(missing_ok=True)
    return written
