"""Interpretability of trained adapters (LoRA paper, Hu et al. 2021, Section 7, for dynamic ranks).

``analyze_run(run_dir)`` writes ``analysis/`` with ``analysis.json``, PNG figures and
``report.md``; the maths lives in :mod:`adarank.analysis.linalg`. ``analyze_run`` is imported
lazily so that importing the package (e.g. for the CLI parser) does not load matplotlib.
"""

from adarank.analysis.base_weights import save_base_weights, weights_from_model
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
from adarank.analysis.naming import module_depth, module_type
from adarank.analysis.run_files import AnalysisInputError, read_adapter

__all__ = [
    "FIGURES",
    "AnalysisInputError",
    "AnalysisResult",
    "DeltaSVD",
    "analyze_run",
    "delta_svd",
    "delta_vs_weight",
    "effective_rank",
    "energy_rank",
    "module_depth",
    "module_type",
    "random_subspace_baseline",
    "read_adapter",
    "save_base_weights",
    "subspace_similarity",
    "subspace_similarity_grid",
    "weights_from_model",
]


def __getattr__(name: str):
    if name in ("FIGURES", "AnalysisResult", "analyze_run"):
        from adarank.analysis import analyze

        return getattr(analyze, name)
    raise AttributeError(f"module 'adarank.analysis' has no attribute {name!r}")
