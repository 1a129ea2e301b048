"""Log an analysis to Weights & Biases (offline unless ``WANDB_MODE`` says otherwise)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["log_analysis", "flat_scalars"]


def flat_scalars(data: dict) -> dict[str, float]:
    """Per-module scalars under W&B-style keys (``spectra/effective_rank/<module>`` ...)."""
    out: dict[str, float] = {}
    for name, r in data["rank_evolution"]["final_ranks"].items():
        out[f"rank/{name}"] = r
    for name, sp in data["spectra"].items():
        out[f"spectra/effective_rank/{name}"] = sp["effective_rank"]
        out[f"spectra/rank_90/{name}"] = sp["rank_90"]
    for name, m in data["delta_vs_w"]["modules"].items():
        if m.get("amplification") is not None:
            out[f"delta_vs_w/amplification/{name}"] = m["amplification"]
    against = data["subspace_similarity"]["against"]
    for name, g in (against or {}).get("grids", {}).items():
        if g is not None:
            out[f"similarity/against/{name}"] = g["phi_full"]
    return out


def log_analysis(
    data: dict, figures: dict[str, Path], out_dir: Path, *, project: str = "adarank"
) -> str:
    """Create a W&B run (``job_type="analysis"``) with the scalars, a per-module table and figures.

    Returns:
        the W&B run directory.
    """
    import wandb

    mode = os.environ.get("WANDB_MODE", "offline")
    run = wandb.init(
        project=project,
        name=f"analyze-{Path(data['run_dir']).name}",
        job_type="analysis",
        dir=str(out_dir),
        mode=mode,
        config={"run_dir": data["run_dir"]},
    )
    try:
        scalars = flat_scalars(data)
        for k, v in scalars.items():
            run.summary[k] = v
        columns = [
            "module",
            "type",
            "depth",
            "final_rank",
            "effective_rank",
            "rank_90",
            "amplification",
        ]
        evo, dvw = data["rank_evolution"], data["delta_vs_w"]["modules"]
        table = wandb.Table(columns=columns)
        for name in data["layers"]:
            table.add_data(
                name,
                evo["module_types"][name],
                evo["depths"][name],
                evo["final_ranks"][name],
                data["spectra"][name]["effective_rank"],
                data["spectra"][name]["rank_90"],
                (dvw.get(name) or {}).get("amplification"),
            )
        run.log(
            {
                "analysis/modules": table,
                **{f"analysis/{k}": wandb.Image(str(p)) for k, p in figures.items()},
            }
        )
        return str(run.dir)
    finally:
        run.finish()
