"""Adapter layer, injection, adapter files and merging (torch only)."""

from adarank.modules.adapter_io import load_adapter, read_adapter_config, save_adapter
from adarank.modules.inject import (
    adapter_layers,
    add_adapters,
    count_parameters,
    match_name,
    merge_adapters,
    resize_to,
    unmerge_adapters,
)
from adarank.modules.svd_lora import SVDLoRALinear

__all__ = [
    "SVDLoRALinear",
    "add_adapters",
    "adapter_layers",
    "count_parameters",
    "load_adapter",
    "match_name",
    "merge_adapters",
    "read_adapter_config",
    "resize_to",
    "save_adapter",
    "unmerge_adapters",
]
