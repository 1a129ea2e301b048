"""Export and serving: merged models, PEFT LoRA adapters, PEFT import, several adapters at once.

Importing this package needs only torch + safetensors; ``peft`` is imported when a PEFT function
runs and ``transformers`` only through the model you pass.
"""

from adarank.export.factors import refactor_lora, total_update_factors
from adarank.export.merged import export_merged, merge_and_unwrap
from adarank.export.multi import MultiAdapterModel
from adarank.export.native import copy_adapter, export_adapter
from adarank.export.peft_export import export_peft, peft_state
from adarank.export.peft_import import import_peft_adapter, read_peft_lora

__all__ = [
    "MultiAdapterModel",
    "copy_adapter",
    "export_adapter",
    "export_merged",
    "export_peft",
    "import_peft_adapter",
    "merge_and_unwrap",
    "peft_state",
    "read_peft_lora",
    "refactor_lora",
    "total_update_factors",
]
