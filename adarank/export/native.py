"""Native export: the adarank adapter files (``adapter.safetensors`` + ``adapter_config.json``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from adarank.export.dirs import atomic_directory
from adarank.modules import read_adapter_config, save_adapter
from adarank.modules.adapter_io import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["export_adapter", "copy_adapter"]


def export_adapter(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    metadata: dict | None = None,
) -> Path:
    """Save ``model``'s adapter (live triplets, shifts, saved modules) to ``out`` atomically.

    Raises:
        ValueError: the model has no adapter layers.
        FileExistsError: ``out`` is not empty and ``overwrite`` is False.
    """
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_adapter(model, tmp, metadata=metadata)
    return Path(out)


def copy_adapter(
    src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Copy a native adapter directory after checking its config (no model needed).

    Raises:
        FileNotFoundError: ``src`` lacks ``adapter_config.json`` or ``adapter.safetensors``.
        ValueError: the config is not an adarank adapter config of a known version.
    """
    read_adapter_config(src)
    weights = Path(src) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (incomplete adapter directory)")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            shutil.copy2(Path(src) / name, tmp / name)
    return Path(out)
