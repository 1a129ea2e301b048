"""``AdapterSnapshot``: native adapter directories during training (for ``adarank analyze``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from adarank.lightning.sharded import gathered
from adarank.modules import save_adapter

__all__ = ["AdapterSnapshot", "snapshot_name"]


def snapshot_name(step: int) -> str:
    """Directory name of the snapshot after optimizer step ``step``: ``step_XXXXXXX``."""
    return f"step_{int(step):07d}"


class AdapterSnapshot(Callback):
    """Save the live adapter every ``every_n_steps`` optimizer steps and at the end of fit.

    Each snapshot is a native adapter directory (``adapter.safetensors`` +
    ``adapter_config.json``, see :func:`adarank.save_adapter`) at
    ``<dirpath>/step_XXXXXXX/``, with ``{"step": step}`` in its metadata. A snapshot directory
    is built under a temporary name and renamed into place, so readers never see a partial one.
    Only global rank 0 writes.

    Args:
        dirpath: output directory; default ``<trainer.default_root_dir>/snapshots``.
        every_n_steps: optimizer steps between snapshots (0: only at the end of fit).
        save_on_train_end: also save after the last step.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        every_n_steps: int = 100,
        *,
        save_on_train_end: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise TypeError(f"every_n_steps={every_n_steps!r}: expected an int")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 0 (0: only at the end)")
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n_steps = every_n_steps
        self.save_on_train_end = bool(save_on_train_end)
        self.saved_steps: list[int] = []

    def _dir(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        return Path(trainer.default_root_dir) / "snapshots"

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Write the snapshot for the current ``trainer.global_step`` (rank 0 only)."""
        step = int(trainer.global_step)
        if self.saved_steps and self.saved_steps[-1] == step:
            return None
        self.saved_steps.append(step)
        model = getattr(pl_module, "model", pl_module)
        cached = getattr(pl_module, "_adarank_base_fingerprint", None)
        if cached is not None:  # taken from the full base before any sharding: no gather
            return self._write(trainer, model, step, cached) if trainer.is_global_zero else None
        with gathered(model):  # a sharded base (all processes): the file's fingerprint reads it
            return self._write(trainer, model, step) if trainer.is_global_zero else None

    def _write(
        self,
        trainer: pl.Trainer,
        model: torch.nn.Module,
        step: int,
        fingerprint: dict | None = None,
    ) -> Path:
        root = self._dir(trainer)
        root.mkdir(parents=True, exist_ok=True)
        final = root / snapshot_name(step)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
        try:
            save_adapter(model, tmp, metadata={"step": step}, fingerprint=fingerprint)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.save(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_on_train_end:
            self.save(trainer, pl_module)
