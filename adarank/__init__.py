"""adarank: LoRA fine-tuning with ranks allocated under a global parameter budget.

The core (adapter layers and the allocation engine) imports only torch; the Lightning names
(``AdaRankModule``, ``RankTrajectoryLogger``) are loaded lazily on first access.
"""

from adarank.allocation import BudgetSchedule, RankController, resolve_budget
from adarank.models.planted import build_planted_task
from adarank.modules import (
    SVDLoRALinear,
    adapter_layers,
    add_adapters,
    count_parameters,
    load_adapter,
    merge_adapters,
    read_adapter_config,
    save_adapter,
    unmerge_adapters,
)

__version__ = "0.1.0"

_LAZY = {
    "AdaRankModule": "adarank.lightning",
    "RankTrajectoryLogger": "adarank.lightning",
    "AdapterSnapshot": "adarank.lightning",
    "initialize_adapters": "adarank.init",
    "MultiAdapterModel": "adarank.export",
    "export_merged": "adarank.export",
    "export_peft": "adarank.export",
    "import_peft_adapter": "adarank.export",
}

__all__ = [
    "AdaRankModule",
    "MultiAdapterModel",
    "export_merged",
    "export_peft",
    "import_peft_adapter",
    "initialize_adapters",
    "AdapterSnapshot",
    "BudgetSchedule",
    "RankController",
    "RankTrajectoryLogger",
    "SVDLoRALinear",
    "adapter_layers",
    "add_adapters",
    "build_planted_task",
    "count_parameters",
    "load_adapter",
    "merge_adapters",
    "read_adapter_config",
    "resolve_budget",
    "save_adapter",
    "unmerge_adapters",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adarank' has no attribute {name!r}")
