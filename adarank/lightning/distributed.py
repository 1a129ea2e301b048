"""Data-parallel support: checked allocation decisions and DDP re-wrapping.

Under DDP every process must take the *same* allocation decision, otherwise parameter shapes
diverge and the next gradient all-reduce deadlocks or corrupts weights. The adapter gradients
are averaged by DDP before ``on_before_optimizer_step``; the forward-side statistics
(``Σ (Q x)²``, captured ``Σ δ xᵀ``, ``Σ x xᵀ``) are summed over processes inside
``RankController.observe`` (the controller also checks its plan hash). On top of that:

1. :func:`check_same_decision` — after every allocation event each process hashes its ranks;
   the hashes are all-gathered through the Lightning strategy and any mismatch raises.
2. :func:`rewrap_ddp` — ``DistributedDataParallel`` registers hooks on the parameter objects
   it saw at construction. Pruning/growing replaces ``nn.Parameter`` objects, so after a shape
   change the LightningModule is wrapped again through the strategy (the new wrapper broadcasts
   rank 0's parameters and builds a fresh reducer). Zero-element parameters of rank-0 layers
   are excluded from DDP (they take no part in the forward pass).
"""

from __future__ import annotations

import gc
import hashlib
import json

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "check_same_decision",
    "decision_hash",
    "ignore_empty_parameters",
    "is_ddp",
    "rewrap_ddp",
]


def is_ddp(trainer: pl.Trainer | None) -> bool:
    """True when the trainer's model is wrapped in ``DistributedDataParallel``."""
    return trainer is not None and isinstance(
        getattr(trainer.strategy, "model", None), DistributedDataParallel
    )


def _world(trainer: pl.Trainer | None) -> int:
    return 1 if trainer is None else int(trainer.world_size)


def decision_hash(step: int, ranks: dict[str, int]) -> int:
    """A 62-bit hash of ``(step, ranks)`` (stable across processes and runs)."""
    text = json.dumps([int(step), sorted((str(k), int(v)) for k, v in ranks.items())])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 2


def check_same_decision(pl_module: pl.LightningModule, step: int, ranks: dict[str, int]) -> None:
    """All-gather :func:`decision_hash` and raise if any process decided differently.

    Raises:
        RuntimeError: naming the step and the per-process hashes.
    """
    trainer = pl_module._trainer
    if _world(trainer) <= 1:
        return
    mine = torch.tensor([decision_hash(step, ranks)], dtype=torch.int64, device=pl_module.device)
    gathered = pl_module.all_gather(mine).flatten().tolist()
    if len(set(gathered)) != 1:
        raise RuntimeError(
            f"processes took different allocation decisions at step {step}: rank hashes "
            f"{gathered} (this process: {ranks}). Allocation statistics must be identical on "
            "every process; please report this with your strategy settings."
        )


def ignore_empty_parameters(module: nn.Module) -> list[str]:
    """Tell DDP to skip zero-element parameters (rank-0 adapters); returns their names."""
    names = [n for n, p in module.named_parameters() if p.numel() == 0]
    previous = [n for n in getattr(module, "_ddp_params_and_buffers_to_ignore", []) if n]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, sorted(set(names) | {n for n in previous if not _is_adapter_name(n)})
    )
    return names


def _is_adapter_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("lora_P", "lora_lambda", "lora_Q")


def rewrap_ddp(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Re-wrap ``pl_module`` in a new DDP after its parameters were replaced.

    Collective: every process must call it at the same step (guaranteed by identical
    decisions). Returns True if a re-wrap happened (False when not running under DDP).
    """
    if not is_ddp(trainer):
        return False
    strategy = trainer.strategy
    ignore_empty_parameters(pl_module)
    old = strategy.model
    strategy.model = strategy._setup_model(pl_module)
    if hasattr(strategy, "_register_ddp_hooks"):
        strategy._register_ddp_hooks()
    del old
    gc.collect()  # drop the old reducer, which removes its autograd hooks
    return True
