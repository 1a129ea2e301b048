"""Tiny models and data for the Lightning tests (random init, a few hundred parameters)."""

from __future__ import annotations

import torch
from torch import nn

from adarank.modules import add_adapters


class ParallelLinears(nn.Module):
    """K independent d×d linear maps: ``y[:, k] = W_k x[:, k]`` (a planted-rank task in small)."""

    def __init__(self, k: int = 4, d: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, K, d)
        return torch.stack([blk(x[:, i]) for i, blk in enumerate(self.blocks)], dim=1)


def planted_data(n: int, k: int = 4, d: int = 8, ranks=(4, 2, 1, 0), seed: int = 0):
    """Inputs (n, K, d) and targets from the frozen base plus a planted low-rank update."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, d, generator=g)
    deltas = []
    for r in ranks:
        u, v = torch.randn(d, r, generator=g), torch.randn(r, d, generator=g)
        deltas.append(u @ v / d**0.5)
    return x, deltas


def make_model(k: int = 4, d: int = 8, init_rank: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ParallelLinears(k, d)
    add_adapters(model, "re:blocks\\.\\d+", init_rank=init_rank, seed=seed)
    return model


def make_dataset(model: nn.Module, n: int = 64, seed: int = 0, noise: float = 0.01):
    """TensorDataset of (x, y) with y = (W0 + Δ_k) x + noise for the frozen base of ``model``."""
    k = len(model.blocks)
    d = model.blocks[0].d_in
    x, deltas = planted_data(n, k, d, ranks=(4, 2, 1, 0)[:k] + (0,) * max(0, k - 4), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        ys = [x[:, i] @ (blk.base_layer.weight + deltas[i]).T for i, blk in enumerate(model.blocks)]
        y = torch.stack(ys, dim=1) + noise * torch.randn(n, k, d, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def fit_tiny(
    *,
    budget=2 * 4 * 17,
    steps: int = 20,
    callbacks=(),
    logger=False,
    root=None,
    val: bool = False,
    **module_kwargs,
):
    """Fit the tiny planted model with a Trainer; returns ``(module, trainer)``."""
    import lightning.pytorch as pl

    from adarank.lightning import AdaRankModule

    pl.seed_everything(0, verbose=False)
    model = make_model(k=4, d=8, init_rank=2, seed=0)
    data = make_dataset(model, n=32, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
    kwargs = dict(interval=2, warmup_steps=2, final_steps=4, lr=1e-2)
    kwargs.update(module_kwargs)
    module = AdaRankModule(model, "regression", budget=budget, **kwargs)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=logger,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=None if root is None else str(root),
        limit_val_batches=1 if val else 0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader, loader if val else None)
    return module, trainer
