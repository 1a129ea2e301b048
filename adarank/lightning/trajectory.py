"""``RankTrajectoryLogger``: the rank trajectory to every logger and to the run directory.

The callback only *reads* the controller's allocation events (``pl_module.controller.history``);
reallocation itself happens inside :class:`~adarank.lightning.module.AdaRankModule`, so adding or
removing this callback never changes the trained weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from adarank.lightning.trajectory_io import (
    BUDGET_CSV,
    HEATMAP_PNG,
    RANKS_CSV,
    event_record,
    rank_matrix,
    render_heatmap,
    write_budget_csv,
    write_ranks_csv,
)

__all__ = ["RankTrajectoryLogger"]


class RankTrajectoryLogger(Callback):
    """Log every allocation event and keep the rank trajectory on disk.

    Logged keys (to every logger in ``trainer.loggers``, at the event's optimizer step):

    * ``rank/<module path>`` — live rank of each adapted module after the event;
    * ``budget/target_params`` — the schedule's parameter budget b(t) at the event;
    * ``budget/live_params`` — live adapter parameters after the event;
    * ``alloc/pruned``, ``alloc/grown`` — triplets removed/added at the event (all modules);
    * ``score/<stat>`` — the event's importance-score summary (e.g. ``score/min``,
      ``score/median``, ``score/max``; whatever the controller's ``score_summary`` carries).

    With a ``WandbLogger``, at the end of fit it also logs ``rank/heatmap`` (image, modules ×
    steps), ``rank/lines`` (``wandb.plot.line_series``, one line per module) and
    ``rank/trajectory`` (``wandb.Table`` with columns ``step, layer, rank``).

    Files (on global rank 0, written atomically): ``ranks.csv`` and ``budget.csv`` after every
    event, ``rank_heatmap.png`` at the end of fit, on exceptions, and every
    ``heatmap_every_n_events`` events (see :mod:`adarank.lightning.trajectory_io`).

    Args:
        run_dir: directory for the files; default ``trainer.default_root_dir``.
        log_scores: also log the ``score/*`` summary.
        heatmap_every_n_events: re-render the heatmap every n events (0: only at the end).

    Attributes:
        history: list of event records (dicts, see ``trajectory_io.event_record``), in order.
            Saved in checkpoints so a resumed run continues the same trajectory.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        *,
        log_scores: bool = True,
        heatmap_every_n_events: int = 0,
    ) -> None:
        super().__init__()
        if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
            raise TypeError(f"run_dir must be a path or None, got {type(run_dir).__name__}")
        if isinstance(heatmap_every_n_events, bool) or not isinstance(heatmap_every_n_events, int):
            raise TypeError(f"heatmap_every_n_events={heatmap_every_n_events!r}: expected an int")
        if heatmap_every_n_events < 0:
            raise ValueError(f"heatmap_every_n_events={heatmap_every_n_events} must be >= 0")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.log_scores = bool(log_scores)
        self.heatmap_every_n_events = heatmap_every_n_events
        self.history: list[dict] = []

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _controller(pl_module: pl.LightningModule):
        if not hasattr(pl_module, "controller"):
            raise TypeError(
                "RankTrajectoryLogger needs an adarank.AdaRankModule (or a module with a "
                f"'controller' attribute), got {type(pl_module).__name__}"
            )
        return pl_module.controller

    def _dir(self, trainer: pl.Trainer) -> Path:
        return self.run_dir if self.run_dir is not None else Path(trainer.default_root_dir)

    @staticmethod
    def metrics_for(record: dict, log_scores: bool = True) -> dict[str, float]:
        """The flat metric dict logged for one event record (keys in the class docstring)."""
        metrics: dict[str, float] = {f"rank/{n}": float(r) for n, r in record["ranks"].items()}
        metrics["budget/target_params"] = float(record["target_params"])
        metrics["budget/live_params"] = float(record["live_params"])
        metrics["alloc/pruned"] = float(sum(record["pruned"].values()))
        metrics["alloc/grown"] = float(sum(record["grown"].values()))
        if log_scores:
            metrics.update({f"score/{k}": float(v) for k, v in record["score_summary"].items()})
        return metrics

    def _write_files(self, trainer: pl.Trainer, heatmap: bool) -> None:
        if not trainer.is_global_zero:
            return
        out = self._dir(trainer)
        write_ranks_csv(out / RANKS_CSV, self.history)
        write_budget_csv(out / BUDGET_CSV, self.history)
        if heatmap:
            render_heatmap(out / HEATMAP_PNG, self.history)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._controller(pl_module)  # fail early on a module without a controller

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        controller = self._controller(pl_module)
        if controller is None:
            return
        last = self.history[-1]["step"] if self.history else -1
        new = [event_record(e) for e in controller.history if int(e.step) > last]
        if not new:
            return
        for record in new:
            self.history.append(record)
            metrics = self.metrics_for(record, self.log_scores)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=record["step"])
        n = self.heatmap_every_n_events
        self._write_files(trainer, heatmap=bool(n) and len(self.history) % n == 0)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_files(trainer, heatmap=True)
        if trainer.is_global_zero and self.history:
            self._log_wandb(trainer)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.history:
            self._write_files(trainer, heatmap=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [event_record(r) for r in state_dict.get("history", [])]

    # ------------------------------------------------------------------ W&B extras
    def _log_wandb(self, trainer: pl.Trainer) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        layers, steps, matrix = rank_matrix(self.history)
        png = self._dir(trainer) / HEATMAP_PNG
        rows = [[e["step"], n, r] for e in self.history for n, r in e["ranks"].items()]
        for logger in loggers:
            logger.experiment.log(
                {
                    "rank/heatmap": wandb.Image(str(png)),
                    "rank/lines": wandb.plot.line_series(
                        xs=steps,
                        ys=matrix,
                        keys=layers,
                        title="adapter rank per module",
                        xname="step",
                    ),
                    "rank/trajectory": wandb.Table(columns=["step", "layer", "rank"], data=rows),
                }
            )
