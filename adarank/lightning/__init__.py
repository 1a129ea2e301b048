"""The Lightning training system: :class:`AdaRankModule` and its callbacks.

* :class:`AdaRankModule` — model + task loss + metrics + the ``RankController``;
* :class:`RankTrajectoryLogger` — rank trajectory to every logger, ``ranks.csv``/``budget.csv``/
  ``rank_heatmap.png`` in the run directory;
* :class:`ShardedBaseStrategy` — FSDP2 of the frozen base with replicated adapters
  (``strategy="sharded_base"``, registered on import);
* :class:`AdapterSnapshot` — native adapter directories during training;
* :func:`make_wandb_logger` — a W&B logger that is offline without an API key and never hangs.
"""

from adarank.lightning.module import AdaRankModule
from adarank.lightning.sharded import ShardedBaseStrategy  # registers strategy="sharded_base"
from adarank.lightning.snapshot import AdapterSnapshot
from adarank.lightning.trajectory import RankTrajectoryLogger
from adarank.lightning.wandb_utils import make_wandb_logger, resolve_wandb_mode

__all__ = [
    "AdaRankModule",
    "AdapterSnapshot",
    "RankTrajectoryLogger",
    "ShardedBaseStrategy",
    "make_wandb_logger",
    "resolve_wandb_mode",
]
