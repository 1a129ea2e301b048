"""Run directories: train one from a config (``fit``), continue it, and read it back.

A run directory (``run.dir``, default ``runs/<recipe>-<timestamp>``)::

    config.yaml        resolved config (rebuilds the base model)
    labels.json        label names ↔ ids (classification)
    summary.json       status ("ok" | "failed"), error, param_budget, trainable_params, ranks,
                       metrics (final val/*), steps, wall_s, ...
    ranks.csv, budget.csv, rank_heatmap.png, adapter/, snapshots/, checkpoints/last.ckpt, logs/

Everything that can be wrong with the input is detected by :func:`prepare` — config validation,
data loading, model building, budget and schedule feasibility — before the directory exists;
:func:`execute` creates it and always leaves a ``summary.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from adarank.config import ConfigError, get_component, load_config, validate_config
from adarank.config.build import (
    add_config_adapters,
    build_data,
    build_model,
    build_module,
    check_feasible,
    estimate_total_steps,
)

__all__ = ["Prepared", "Run", "execute", "load_run", "prepare", "prepare_resume", "write_json"]

CONFIG_NAME = "config.yaml"
SUMMARY_NAME = "summary.json"
LABELS_NAME = "labels.json"


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file in the same directory, then ``os.replace``)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def _write_config(cfg: DictConfig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, path)


@dataclass
class Prepared:
    """Everything built for a fit, before the run directory exists."""

    config: DictConfig
    run_dir: Path
    data: Any
    model: Any
    module: Any
    total_steps: int | None
    init_report: dict = field(default_factory=dict)
    ckpt_path: Path | None = None


def _build(cfg: DictConfig, run_dir: Path, ckpt_path: Path | None) -> Prepared:
    import lightning

    lightning.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    data = build_data(cfg)
    model = build_model(cfg, data)
    init_report = add_config_adapters(cfg, model, data)
    model.train()  # builders return eval mode; fine-tuning uses the model's dropout
    module = build_module(cfg, model, data)
    total = estimate_total_steps(cfg, data)
    check_feasible(cfg, module, total)
    return Prepared(cfg, run_dir, data, model, module, total, init_report, ckpt_path)


def prepare(recipe: str | os.PathLike, overrides: list[str] = ()) -> Prepared:
    """Load, validate and build a new run (raises ConfigError/ValueError/... on bad input).

    Raises:
        ConfigError: invalid config, or ``run.dir`` exists and is not empty.
    """
    cfg = load_config(recipe, overrides)
    validate_config(cfg)
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run.dir={str(run_dir)!r}: directory exists and is not empty; choose another "
            "run.dir or continue it with `adarank fit --resume`"
        )
    return _build(cfg, run_dir, None)


def prepare_resume(run_dir: str | os.PathLike, overrides: list[str] = ()) -> Prepared:
    """Rebuild a run from ``<run_dir>/config.yaml`` (+ overrides) to continue its last checkpoint."""
    run_dir = Path(run_dir)
    cfg_path, ckpt = run_dir / CONFIG_NAME, run_dir / "checkpoints" / "last.ckpt"
    if not cfg_path.is_file():
        raise ConfigError(f"--resume {str(run_dir)!r}: no {CONFIG_NAME} (not a run directory?)")
    if not ckpt.is_file():
        raise ConfigError(f"--resume {str(run_dir)!r}: no checkpoints/last.ckpt to continue from")
    cfg = load_config(cfg_path, [*overrides, f"run.dir={run_dir}"])
    validate_config(cfg)
    return _build(cfg, run_dir, ckpt)


def _summary_base(p: Prepared) -> dict[str, Any]:
    return {
        "recipe": str(p.config.run.name),
        "run_dir": str(p.run_dir),
        "param_budget": p.module.param_budget,
        "base_params": p.module.base_params,
        "init": p.init_report.get("strategy") if p.init_report else "lora",
    }


def _final_summary(p: Prepared, trainer, wall: float) -> dict[str, Any]:
    from adarank.config.trainer import ValidationTracker
    from adarank.modules import adapter_layers, count_parameters

    tracker = next(c for c in trainer.callbacks if isinstance(c, ValidationTracker))
    if tracker.last_step != trainer.global_step:
        trainer.validate(p.module, datamodule=p.data, verbose=False)
    counts = count_parameters(p.model)
    ranks = {n: layer.rank for n, layer in adapter_layers(p.model).items()}
    metrics = dict(tracker.metrics)
    for callback in trainer.callbacks:  # e.g. GenerationEvaluator: base/val/* before training
        metrics.update(getattr(callback, "summary_metrics", None) or {})
    planted = getattr(p.data, "planted", None)
    if planted is not None:
        metrics["planted/rank_recovery_error"] = float(planted.rank_recovery_error(ranks))
        metrics["planted/noise_floor"] = float(planted.noise_floor)
    return {
        **_summary_base(p),
        "status": "ok",
        "trainable_params": counts["adapter"] + counts["saved"],
        "adapter_params": counts["adapter"],
        "saved_params": counts["saved"],
        "ranks": ranks,
        "metrics": metrics,
        "steps": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "wall_s": round(wall, 2),
    }


def _fixed_rank_files(p: Prepared, step: int) -> None:
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


def execute(p: Prepared) -> dict[str, Any]:
    """Create the run directory, train, save the adapter and write ``summary.json``.

    Returns:
        the summary. Exceptions during training are re-raised after a ``"failed"`` summary
        (with the error text) has been written.
    """
    from adarank.config.trainer import build_trainer
    from adarank.modules import save_adapter

    p.run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(p.config, p.run_dir / CONFIG_NAME)
    if hasattr(p.data, "save_labels"):
        p.data.save_labels(p.run_dir / LABELS_NAME)
    start = time.perf_counter()
    try:
        trainer = build_trainer(p.config, p.run_dir)
        ckpt = str(p.ckpt_path) if p.ckpt_path else None
        trainer.fit(p.module, datamodule=p.data, ckpt_path=ckpt, weights_only=True)
        trainer.save_checkpoint(p.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        save_adapter(
            p.model,
            p.run_dir / "adapter",
            metadata={"recipe": str(p.config.run.name), "step": int(trainer.global_step)},
        )
        _fixed_rank_files(p, int(trainer.global_step))
        summary = _final_summary(p, trainer, time.perf_counter() - start)
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        summary = {
            **_summary_base(p),
            "status": status,
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(limit=20)[-4000:],
            "wall_s": round(time.perf_counter() - start, 2),
        }
        write_json(p.run_dir / SUMMARY_NAME, summary)
        raise
    finally:
        _finish_wandb()
    write_json(p.run_dir / SUMMARY_NAME, summary)
    return summary


def _finish_wandb() -> None:
    """Close an open W&B run so the next fit in this process starts its own."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


@dataclass
class Run:
    """A finished run read back by :func:`load_run`.

    Attributes:
        run_dir: the directory.
        config: the resolved config.
        model: the base model rebuilt from the config with ``adapter/`` loaded (eval mode).
        tokenizer: the model's tokenizer (None for non-text tasks).
        task: ``"classification"``, ``"causal_lm"`` or ``"regression"``.
        labels: label names in id order (classification), else None.
        summary: ``summary.json`` contents ({} if missing).
        data: the datamodule if it was built (planted task, or ``load_data=True``).
    """

    run_dir: Path
    config: DictConfig
    model: Any
    tokenizer: Any
    task: str
    labels: list[str] | None = None
    summary: dict = field(default_factory=dict)
    data: Any = None

    def build_data(self, setup: bool = True):
        """Build (and set up) the run's datamodule, caching it on ``self.data``."""
        if self.data is None:
            self.data = build_data(self.config, setup=setup)
        return self.data


def load_run(
    run_dir: str | os.PathLike, *, load_data: bool = False, adapter: str = "adapter"
) -> Run:
    """Rebuild a run's model from ``config.yaml`` and load its adapter.

    Args:
        run_dir: a directory written by ``adarank fit``.
        load_data: also build the datamodule (always done when the model needs it).
        adapter: adapter sub-directory to load (e.g. ``"snapshots/step_0000100"``).

    Raises:
        FileNotFoundError: missing ``config.yaml`` or adapter directory.
    """
    from adarank.config.instantiate import signature_params
    from adarank.modules import load_adapter

    root = Path(run_dir)
    if not (root / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{root / CONFIG_NAME} not found: not an adarank run directory")
    if not (root / adapter).is_dir():
        raise FileNotFoundError(f"{root / adapter} not found (did the run finish?)")
    cfg = OmegaConf.load(root / CONFIG_NAME)
    labels = None
    if (root / LABELS_NAME).is_file():
        labels = json.loads((root / LABELS_NAME).read_text())["labels"]
    model_fn = get_component(cfg.model._component_, "model._component_")
    data_cls = get_component(cfg.data._component_, "data._component_")
    needs_data = "data" in signature_params(model_fn)
    data = build_data(cfg) if (needs_data or load_data) else None
    model = build_model(cfg, data, num_labels=len(labels) if labels else None)
    load_adapter(model, root / adapter)
    model.eval()
    tokenizer = None
    name = cfg.model.get("name_or_path")
    if name is not None:
        from adarank.models import build_tokenizer

        tokenizer = getattr(data, "tokenizer", None) or build_tokenizer(str(name))
    summary = {}
    if (root / SUMMARY_NAME).is_file():
        summary = json.loads((root / SUMMARY_NAME).read_text())
    task = getattr(data_cls, "task_type", "classification")
    return Run(root, cfg, model, tokenizer, task, labels, summary, data)


def load_recipe_config(recipe: str, overrides: list[str] = ()) -> DictConfig:
    """Load and validate a recipe without building anything (``adarank validate``)."""
    cfg = load_config(recipe, overrides)
    validate_config(cfg)
    return cfg
