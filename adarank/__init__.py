"""adarank: LoRA fine-tuning with ranks allocated under a global parameter budget."""

from adarank.modules import (
    SVDLoRALinear,
    adapter_layers,
    add_adapters,
    count_parameters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)

__version__ = "0.1.0"

__all__ = [
    "SVDLoRALinear",
    "adapter_layers",
    "add_adapters",
    "count_parameters",
    "load_adapter",
    "merge_adapters",
    "save_adapter",
    "unmerge_adapters",
]
