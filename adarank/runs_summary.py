"""The ``summary.json`` of a run: what :func:`adarank.runs.execute` records at the end.

Keys: ``status`` ("ok" | "failed" | "interrupted"), ``recipe``, ``run_dir``, ``param_budget``,
``base_params``, ``init``, ``trainable_params``, ``adapter_params``, ``saved_params``, ``ranks``,
``metrics`` (final ``val/*``, planted-task extras), ``steps``, ``epochs``, ``wall_s``; when
relevant ``warnings`` (e.g. a final val/loss :data:`EXPLODED_FACTOR` times the first step's
training loss, skipped non-finite steps), ``skipped_steps``, ``sharded_base`` (under
``trainer.strategy=sharded_base``: processes, frozen base parameters, the share each process
held), ``reason`` / ``error`` / ``failed_step`` (a failed run), ``nonfinite_values`` (numbers
written as null).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adarank.runs import Prepared

__all__ = [
    "EXPLODED_FACTOR",
    "diverged_summary",
    "final_summary",
    "fixed_rank_files",
    "summary_base",
]

#: a final val/loss this many times the first step's training loss adds a warning
EXPLODED_FACTOR = 10.0


def summary_base(p: Prepared) -> dict[str, Any]:
    """Keys every summary has, whatever the outcome."""
    return {
        "recipe": str(p.config.run.name),
        "run_dir": str(p.run_dir),
        "param_budget": p.module.param_budget,
        "base_params": p.module.base_params,
        "init": p.init_report.get("strategy") if p.init_report else "lora",
    }


def _state_summary(p: Prepared, trainer, metrics: dict, wall: float) -> dict[str, Any]:
    from adarank.modules import adapter_layers, count_parameters

    counts = count_parameters(p.model)
    ranks = {n: layer.rank for n, layer in adapter_layers(p.model).items()}
    for callback in trainer.callbacks:  # e.g. GenerationEvaluator: base/val/* before training
        metrics.update(getattr(callback, "summary_metrics", None) or {})
    planted = getattr(p.data, "planted", None)
    if planted is not None:
        metrics["planted/rank_recovery_error"] = float(planted.rank_recovery_error(ranks))
        metrics["planted/noise_floor"] = float(planted.noise_floor)
    out = {
        **summary_base(p),
        "trainable_params": counts["adapter"] + counts["saved"],
        "adapter_params": counts["adapter"],
        "saved_params": counts["saved"],
        "ranks": ranks,
        "metrics": metrics,
        "steps": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "wall_s": round(wall, 2),
    }
    if p.module.guard.skipped:
        out["skipped_steps"] = list(p.module.guard.skipped)
    shards = getattr(trainer.strategy, "shard_report", None)  # trainer.strategy=sharded_base
    if shards is not None:
        out["sharded_base"] = shards.summary()
    return out


def _tracker(trainer):
    from adarank.config.trainer import ValidationTracker

    return next(c for c in trainer.callbacks if isinstance(c, ValidationTracker))


def final_summary(p: Prepared, trainer, wall: float) -> dict[str, Any]:
    """Summary of a run that trained to the end (validated at the last step).

    Status "failed" when a final validation metric is non-finite; ``warnings`` lists skipped
    steps and a final val/loss far above the first step's training loss.
    """
    tracker = _tracker(trainer)
    if tracker.last_step != trainer.global_step:
        trainer.validate(p.module, datamodule=p.data, verbose=False)
    summary = {"status": "ok", **_state_summary(p, trainer, dict(tracker.metrics), wall)}
    metrics = summary["metrics"]
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        summary["status"] = "failed"
        summary["reason"] = (
            f"final validation gave non-finite {', '.join(bad)} at step {summary['steps']} "
            "although every trained parameter is finite (check the validation data)"
        )
        summary["error"] = summary["reason"]
    warnings = p.module.guard.warnings(metrics.get("val/loss"), EXPLODED_FACTOR)
    if warnings:
        summary["warnings"] = warnings
    return summary


def diverged_summary(p: Prepared, trainer, err, wall: float) -> dict[str, Any]:
    """Status "failed" with the reason; the last finite adapter is saved to ``adapter/``."""
    from adarank.modules import save_adapter

    save_adapter(
        p.model,
        p.run_dir / "adapter",
        metadata={"recipe": str(p.config.run.name), "step": int(trainer.global_step)},
    )
    fixed_rank_files(p, int(trainer.global_step))
    tracker = _tracker(trainer)
    summary = _state_summary(p, trainer, dict(tracker.metrics), wall)
    summary.update(
        status="failed",
        reason=err.reason,
        error=f"{type(err).__name__}: {err.reason}",
        failed_step=err.step,
        metrics_step=tracker.last_step,
        adapter="adapter/ holds the parameters of the last finite step",
    )
    return summary


def fixed_rank_files(p: Prepared, step: int) -> None:
    """ranks.csv / budget.csv / heatmap for runs without allocation events (one record)."""
    if (p.run_dir / "ranks.csv").is_file() and (p.run_dir / "ranks.csv").stat().st_size > 20:
        return
    from adarank.lightning.trajectory_io import render_heatmap, write_budget_csv, write_ranks_csv
    from adarank.modules import adapter_layers

    layers = adapter_layers(p.model)
    live = sum(layer.live_params for layer in layers.values())
    record = {
        "step": step,
        "target_params": p.module.param_budget or live,
        "live_params": live,
        "ranks": {n: layer.rank for n, layer in layers.items()},
        "pruned": {},
        "grown": {},
        "score_summary": {},
    }
    write_ranks_csv(p.run_dir / "ranks.csv", [record])
    write_budget_csv(p.run_dir / "budget.csv", [record])
    render_heatmap(p.run_dir / "rank_heatmap.png", [record], title="fixed ranks")
