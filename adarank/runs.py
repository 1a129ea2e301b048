"""Run directories: train one from a config (``fit``), continue it, and read it back.

A run directory (``run.dir``, default ``runs/<recipe>-<timestamp>``)::

    config.yaml        resolved config (rebuilds the base model)
    labels.json        label names ↔ ids (classification)
    summary.json       status ("ok" | "failed" | "interrupted"), error / reason, param_budget,
                       trainable_params, ranks, metrics (final val/*), steps, wall_s, warnings
    ranks.csv, budget.csv, rank_heatmap.png, adapter/, snapshots/, checkpoints/last.ckpt, logs/

Everything that can be wrong with the input is detected by :func:`preflight` — config
validation, data loading, model building, budget and schedule feasibility, the Trainer's
arguments — before anything is written; ``adarank validate`` runs exactly that and writes
nothing. :func:`execute` creates the directory and always leaves a strict-JSON ``summary.json``.
A run that diverges (non-finite loss, gradients or parameters; see
:mod:`adarank.lightning.divergence`) ends with status ``"failed"``, a ``reason`` naming the
step, and the adapter of the last finite step in ``adapter/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import traceback
from collections.abc import Iterator
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
from adarank.runs_io import write_json, write_text
from adarank.runs_summary import diverged_summary, final_summary, fixed_rank_files, summary_base

__all__ = [
    "Prepared",
    "Run",
    "execute",
    "load_run",
    "preflight",
    "prepare",
    "prepare_resume",
    "write_json",
]

CONFIG_NAME = "config.yaml"
SUMMARY_NAME = "summary.json"
LABELS_NAME = "labels.json"
#: what one attempt of ``fit`` writes besides config.yaml (removed before a restart)
ATTEMPT_OUTPUTS = (
    SUMMARY_NAME,
    LABELS_NAME,
    "ranks.csv",
    "budget.csv",
    "rank_heatmap.png",
    "adapter",
    "snapshots",
    "checkpoints",
    "logs",
)


@dataclass
class Prepared:
    """Everything built for a fit, before the run directory is written.

    Attributes:
        restart: the run directory holds an attempt that stopped before its first checkpoint;
            :func:`execute` removes that attempt's outputs (:data:`ATTEMPT_OUTPUTS`) first.
        joined: this process was launched by process 0 of a multi-process run and joins its
            run directory without writing to it (see :mod:`adarank.runs_ddp`).
    """

    config: DictConfig
    run_dir: Path
    data: Any
    model: Any
    module: Any
    total_steps: int | None
    init_report: dict = field(default_factory=dict)
    ckpt_path: Path | None = None
    restart: bool = False
    joined: bool = False


@contextlib.contextmanager
def _stage(section: str) -> Iterator[None]:
    """Prefix a builder's ValueError / TypeError / OSError with the config section it used."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError, OSError) as err:
        raise ConfigError(f"{section}: {err}") from err


def preflight(cfg: DictConfig, run_dir: Path, ckpt_path: Path | None = None) -> Prepared:
    """Build data, model, adapters and module and check them all; writes nothing.

    The one pre-flight shared by ``fit``, ``fit --resume`` and ``validate``.

    Raises:
        ConfigError, ValueError, TypeError, OSError: bad input (exit code 2).
    """
    import lightning

    from adarank.config.trainer import check_trainer
    from adarank.runs_ddp import check_strategy

    lightning.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    with _stage("data"):
        data = build_data(cfg)
    with _stage("model"):
        model = build_model(cfg, data)
    with _stage("adapter"):
        init_report = add_config_adapters(cfg, model, data)
    model.train()  # builders return eval mode; fine-tuning uses the model's dropout
    with _stage("schedule / allocation / optimizer"):
        module = build_module(cfg, model, data)
    with _stage("data"):
        total = estimate_total_steps(cfg, data)
    check_feasible(cfg, module, total)
    check_strategy(cfg, allocation=module.param_budget is not None)
    check_trainer(cfg, run_dir)
    return Prepared(cfg, run_dir, data, model, module, total, init_report, ckpt_path)


def _check_run_dir(run_dir: Path) -> None:
    """``run.dir`` must be absent or an empty directory, somewhere writable."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={str(run_dir)!r}: exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run.dir={str(run_dir)!r}: directory exists and is not empty; choose another "
            "run.dir, or continue it with `adarank fit --resume` (which also restarts a run "
            "that stopped before its first checkpoint)"
        )
    parent = run_dir.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"run.dir={str(run_dir)!r}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir={str(run_dir)!r}: {parent} is not writable")


def prepare(recipe: str | os.PathLike, overrides: list[str] = ()) -> Prepared:
    """Load, validate and build a new run (raises ConfigError/ValueError/... on bad input).

    Raises:
        ConfigError: invalid config, or ``run.dir`` exists and is not empty.
    """
    cfg = load_config(recipe, overrides)
    validate_config(cfg)
    run_dir = Path(cfg.run.dir)
    _check_run_dir(run_dir)
    return preflight(cfg, run_dir)


def prepare_resume(run_dir: str | os.PathLike, overrides: list[str] = ()) -> Prepared:
    """Check and rebuild a run to continue it (see :mod:`adarank.runs_resume`); writes nothing."""
    from adarank.runs_resume import prepare_resume as _prepare_resume

    return _prepare_resume(run_dir, overrides)


def _clear_attempt(run_dir: Path) -> None:
    for name in ATTEMPT_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def execute(p: Prepared) -> dict[str, Any]:
    """Create the run directory, train, save the adapter and write ``summary.json``.

    With several processes (DDP) only process 0 writes; the others join the run (see
    :mod:`adarank.runs_ddp`) and return the same summary.

    Returns:
        the summary (status "ok").

    Raises:
        TrainingDiverged: non-finite values (or a non-finite final validation metric); the
            "failed" summary and the last finite adapter are written first.
        Exception: any other error during training, re-raised after a "failed" summary (with
            the error text) has been written.
    """
    from adarank.config.trainer import build_trainer
    from adarank.lightning.divergence import TrainingDiverged
    from adarank.runs_ddp import announce, barrier

    if not p.joined:
        if p.restart:
            _clear_attempt(p.run_dir)
        p.run_dir.mkdir(parents=True, exist_ok=True)
        write_text(p.run_dir / CONFIG_NAME, OmegaConf.to_yaml(p.config, resolve=True))
        if hasattr(p.data, "save_labels"):
            p.data.save_labels(p.run_dir / LABELS_NAME)
    start = time.perf_counter()
    trainer = None
    try:
        trainer = build_trainer(p.config, p.run_dir)
        ckpt = str(p.ckpt_path) if p.ckpt_path else None
        with announce(p):  # processes launched by trainer.fit join this run directory
            trainer.fit(p.module, datamodule=p.data, ckpt_path=ckpt, weights_only=True)
        summary = _finish(p, trainer, start)
    except TrainingDiverged as err:
        if _writes(p, trainer):
            summary = diverged_summary(p, trainer, err, time.perf_counter() - start)
            write_json(p.run_dir / SUMMARY_NAME, summary)
        barrier(trainer)  # every process stops at the same step
        raise
    except BaseException as err:
        if _writes(p, trainer):
            _write_stopped(p, trainer, err, start)
        stopped = isinstance(err, SystemExit) and getattr(trainer, "interrupted", False)
        if stopped:  # Lightning turns Ctrl-C into sys.exit(1) after marking the trainer
            raise KeyboardInterrupt from err
        raise
    finally:
        _finish_wandb()
    if _writes(p, trainer):
        write_json(p.run_dir / SUMMARY_NAME, summary)
    barrier(trainer)
    if summary["status"] != "ok":
        raise TrainingDiverged(summary["steps"], summary["reason"])
    return summary


def _writes(p: Prepared, trainer: Any) -> bool:
    """Whether this process writes the run's files (process 0 only)."""
    return not p.joined and (trainer is None or trainer.is_global_zero)


def _finish(p: Prepared, trainer: Any, start: float) -> dict[str, Any]:
    """Final checkpoint, adapter and rank files (process 0), final validation (all)."""
    from adarank.lightning.checkpointing import base_fingerprint_of
    from adarank.modules import save_adapter

    # collective under DDP: every process calls it, process 0 writes
    trainer.save_checkpoint(p.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    if _writes(p, trainer):
        save_adapter(
            p.model,
            p.run_dir / "adapter",
            metadata={"recipe": str(p.config.run.name), "step": int(trainer.global_step)},
            fingerprint=base_fingerprint_of(p.module),  # cached: no gather of a sharded base
        )
    if _writes(p, trainer):
        fixed_rank_files(p, int(trainer.global_step))
    return final_summary(p, trainer, time.perf_counter() - start)


def _write_stopped(p: Prepared, trainer: Any, err: BaseException, start: float) -> None:
    """The summary of a run stopped by Ctrl-C ("interrupted") or an error ("failed")."""
    stopped = isinstance(err, KeyboardInterrupt) or (
        isinstance(err, SystemExit) and getattr(trainer, "interrupted", False)
    )
    summary = {
        **summary_base(p),
        "status": "interrupted" if stopped else "failed",
        "error": "interrupted (Ctrl-C)" if stopped else f"{type(err).__name__}: {err}",
        "steps": None if trainer is None else int(trainer.global_step),
        "wall_s": round(time.perf_counter() - start, 2),
    }
    if not stopped:
        summary["traceback"] = traceback.format_exc(limit=20)[-4000:]
    write_json(p.run_dir / SUMMARY_NAME, summary)


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
    """Load and validate a recipe's config only (no data, no model; see :func:`prepare`)."""
    cfg = load_config(recipe, overrides)
    validate_config(cfg)
    return cfg
