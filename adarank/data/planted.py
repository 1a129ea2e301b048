"""Data module for the planted-rank benchmark (:mod:`adarank.models.planted`).

The planted task owns both the frozen model (parallel linear blocks) and its train/validation
``TensorDataset``s; this module builds it in :meth:`PlantedDataModule.setup` and serves batches
``(x, y)``. The model builder :func:`adarank.models.build_planted_model` takes it from here, so
model and data always come from one task object.
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from adarank.data.resumable import ResumableDataLoader

__all__ = ["PlantedDataModule"]


class PlantedDataModule(L.LightningDataModule):
    """Planted low-rank regression (see ``adarank.models.planted.build_planted_task``).

    Args:
        ranks: planted rank of each block (``[16, 8, ...]`` or ``"16,8,..."``).
        dims: block width(s) (one int for all, or one per block).
        input_cov: input covariance kind (e.g. ``"white"``).
        noise_std: target noise standard deviation.
        n_train: training examples.
        n_val: validation examples.
        seed: task seed (planted weights, inputs, noise).
        batch_size: training batch size.
        eval_batch_size: validation batch size (default ``batch_size``).
    """

    task_type = "regression"

    def __init__(
        self,
        ranks: str | list[int] = "16,8,8,4,4,2,2,1,1,1,1,0",
        dims: str | int | list[int] = 64,
        input_cov: str = "white",
        noise_std: float = 0.1,
        n_train: int = 4096,
        n_val: int = 1024,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.kwargs = dict(
            ranks=ranks if isinstance(ranks, str) else list(ranks),
            dims=dims if isinstance(dims, (int, str)) else list(dims),
            input_cov=input_cov,
            noise_std=noise_std,
            n_train=n_train,
            n_val=n_val,
            seed=seed,
        )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.planted = None

    def setup(self, stage: str | None = None) -> None:
        """Build the planted task once (idempotent)."""
        if self.planted is None:
            from adarank.models.planted import build_planted_task

            self.planted = build_planted_task(**self.kwargs)

    def train_dataloader(self) -> ResumableDataLoader:
        """Seeded per-epoch shuffle (``seed + epoch``), resumable mid-epoch from a checkpoint."""
        return ResumableDataLoader(
            self.planted.train_dataset(), batch_size=self.batch_size, shuffle=True, seed=self.seed
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.planted.val_dataset(), batch_size=self.eval_batch_size)
