"""Build the Lightning ``Trainer``, its loggers and callbacks for a run directory.

Run-directory layout produced through these objects::

    <run.dir>/ranks.csv, budget.csv, rank_heatmap.png   RankTrajectoryLogger
    <run.dir>/snapshots/step_XXXXXXX/                     AdapterSnapshot
    <run.dir>/checkpoints/last.ckpt                       ModelCheckpoint (+ a final save)
    <run.dir>/logs/csv/version_N/metrics.csv                       CSVLogger          (logger.csv)
    <run.dir>/logs/wandb/                                 WandbLogger        (logger.wandb)
    <run.dir>/logs/...                                    logger.extra (save_dir unless given)

``logger.extra`` and ``callbacks.extra`` are lists of ``_component_`` nodes (e.g.
``lightning.pytorch.loggers.TensorBoardLogger``, ``lightning.pytorch.callbacks.EarlyStopping``)
added after the built-in ones.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "ValidationTracker",
    "build_callbacks",
    "build_loggers",
    "build_trainer",
    "check_trainer",
]


class ValidationTracker(Callback):
    """Remember the optimizer step and the ``val/*`` metrics of the latest validation run.

    Attributes:
        last_step: ``trainer.global_step`` at the end of the latest validation (None: none ran).
        metrics: ``{name: float}`` of the ``val/*`` metrics then.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_step: int | None = None
        self.metrics: dict[str, float] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.last_step = int(trainer.global_step)
        self.metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
        }


def _plain(cfg: DictConfig | Mapping) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def build_loggers(cfg: DictConfig | Mapping, run_dir: Path) -> list:
    """CSV and/or W&B loggers under ``<run_dir>/logs`` per the ``logger`` section."""
    from lightning.pytorch.loggers import CSVLogger

    from adarank.config.structured import typed

    plain = typed(cfg)
    log = plain["logger"]
    loggers: list = []
    if log["csv"]:
        loggers.append(CSVLogger(save_dir=str(run_dir / "logs"), name="csv"))
    if log["wandb"]:
        from adarank.lightning import make_wandb_logger

        loggers.append(
            make_wandb_logger(
                log["wandb_project"], run_dir / "logs", log["wandb_mode"], name=plain["run"]["name"]
            )
        )
    loggers += _extras(plain, "logger", save_dir=str(run_dir / "logs"))
    return loggers


def _extras(plain: dict, section: str, **injected: Any) -> list:
    """Instantiate ``<section>.extra`` (a builder's error names its item as bad input)."""
    from adarank.config.components import extra_nodes
    from adarank.config.errors import ConfigError
    from adarank.config.instantiate import instantiate

    out = []
    for i, node in enumerate(extra_nodes(plain.get(section))):
        try:
            out.append(instantiate(node, f"{section}.extra[{i}]", **injected))
        except ConfigError:
            raise
        except Exception as err:  # the component's own argument checks
            raise ConfigError(
                f"{section}.extra[{i}]={node!r}: {type(err).__name__}: {err}"
            ) from err
    return out


def build_callbacks(cfg: DictConfig | Mapping, run_dir: Path) -> list[Callback]:
    """Checkpoint, rank trajectory, adapter snapshots, the validation tracker, ``extra``."""
    from adarank.config.structured import typed
    from adarank.lightning import AdapterSnapshot, RankTrajectoryLogger

    plain = typed(cfg)
    cb = plain["callbacks"]
    every = cb["checkpoint_every_n_steps"]
    return [
        ModelCheckpoint(
            dirpath=str(run_dir / "checkpoints"),
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every or None,
        ),
        RankTrajectoryLogger(run_dir, heatmap_every_n_events=cb["heatmap_every_n_events"]),
        AdapterSnapshot(run_dir / "snapshots", every_n_steps=cb["snapshot_every_n_steps"]),
        ValidationTracker(),
        *_generation_callbacks(plain, run_dir),
        *_extras(plain, "callbacks"),
    ]


def _generation_callbacks(plain: dict, run_dir: Path) -> list[Callback]:
    """A ``GenerationEvaluator`` when the datamodule can be decoded (``generation_examples``)."""
    from adarank.config.instantiate import COMPONENT_KEY, get_component

    data = plain.get("data") or {}
    try:
        data_cls = get_component(data[COMPONENT_KEY], "data._component_")
    except (KeyError, TypeError, ValueError):
        return []
    if not hasattr(data_cls, "generation_examples"):
        return []
    from adarank.lightning.generation import GenerationEvaluator

    options = plain["callbacks"]["generation"] or {}
    return [GenerationEvaluator(run_dir, **options)]


def build_trainer(cfg: DictConfig | Mapping, run_dir: Path, **overrides: Any) -> pl.Trainer:
    """``lightning.Trainer(**cfg.trainer)`` rooted at ``run_dir`` with the run's loggers/callbacks."""
    kwargs = dict(_plain(cfg).get("trainer") or {})
    kwargs.update(overrides)
    loggers = build_loggers(cfg, run_dir)
    return pl.Trainer(
        default_root_dir=str(run_dir),
        logger=loggers if loggers else False,
        callbacks=build_callbacks(cfg, run_dir),
        **kwargs,
    )


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's informational messages (device summary, tips) for a dry build."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_trainer(cfg: DictConfig | Mapping, run_dir: Path) -> None:
    """Construct the run's ``Trainer`` (callbacks included, no logger) and discard it.

    Nothing is written: the loggers, which create directories, are left out. Catches what only
    Lightning knows (accelerator, precision, strategy, devices, callback conflicts) before the
    run directory exists.

    Raises:
        ConfigError: naming the ``trainer`` section and Lightning's message.
    """
    from adarank.config.errors import ConfigError

    kwargs = dict(_plain(cfg).get("trainer") or {})
    callbacks = build_callbacks(cfg, run_dir)
    try:
        with _quiet_lightning():
            pl.Trainer(default_root_dir=str(run_dir), logger=False, callbacks=callbacks, **kwargs)
    except Exception as err:  # any failure here comes from the trainer arguments
        shown = {k: v for k, v in kwargs.items() if k in str(err)} or kwargs
        raise ConfigError(
            f"trainer {shown}: lightning.Trainer rejects it: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err
