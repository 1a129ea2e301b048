r"""Merged export: fold every ΔW into its base weight and save a plain transformers model.

LoRA's deployment argument (Hu et al. 2021, §4.1): ``W = W0 + ΔW`` can be computed once, so the
adapted model runs with **no extra inference latency** and no adarank code. Here each
:class:`~adarank.modules.SVDLoRALinear` is merged (in float32, cast back to the base dtype, see
``SVDLoRALinear.merge``) and then replaced by its own base ``nn.Linear`` / ``Conv1D``, so the model
is the original transformers architecture again and ``save_pretrained`` writes a directory that
``AutoModel*.from_pretrained`` loads with plain ``transformers``. A data-aware init's shift is
already inside the base weight (``W0 − shift``), so the merged weight is ``W0 − shift + ΔW``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adarank.export.dirs import atomic_directory
from adarank.modules import adapter_layers

__all__ = ["merge_and_unwrap", "export_merged"]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def merge_and_unwrap(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every adapter merged into its base layer and the wrapper removed.

    Args:
        model: a model with adarank adapters.
        inplace: modify ``model`` itself (saves memory when the model is loaded only to be
            exported); by default a deep copy is merged and ``model`` is left unchanged.

    Returns:
        the plain model (no :class:`SVDLoRALinear` left); base dtypes are kept.

    Raises:
        ValueError: the model has no adapter layers, or a merged weight is not finite.
    """
    if not adapter_layers(model):
        raise ValueError(
            "the model has no adarank adapter layers to merge (was the adapter loaded?)"
        )
    if not inplace:
        model = copy.deepcopy(model)
    for name, layer in adapter_layers(model).items():
        layer.merge()  # fp32 arithmetic, cast back to the base dtype
        base = layer.base_layer
        if not torch.isfinite(base.weight).all():
            raise ValueError(
                f"merged weight of layer {name!r} is not finite (NaN/inf in the adapter or an "
                f"overflow in dtype {base.weight.dtype}); export refused"
            )
        _set_submodule(model, name, base)
    if hasattr(model, "_adarank_modules_to_save"):
        del model._adarank_modules_to_save
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def export_merged(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    tokenizer: Any | None = None,
    overwrite: bool = False,
    inplace: bool = False,
    safe_serialization: bool = True,
) -> Path:
    """Write a merged ``save_pretrained`` directory (plus the tokenizer when given).

    Args:
        model: a transformers ``PreTrainedModel`` with adarank adapters.
        out: output directory (written atomically).
        tokenizer: saved next to the model when given, so the directory is self-contained.
        overwrite: replace a non-empty ``out``.
        inplace: merge ``model`` itself instead of a copy (see :func:`merge_and_unwrap`).
        safe_serialization: write ``model.safetensors`` (default) rather than a pickle.

    Returns:
        the output directory.

    Raises:
        TypeError: ``model`` has no ``save_pretrained`` (not a transformers model).
        ValueError: see :func:`merge_and_unwrap`.
        FileExistsError: ``out`` is not empty and ``overwrite`` is False.
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"merged export needs a transformers PreTrainedModel (with save_pretrained), got "
            f"{type(model).__name__}; use merge_and_unwrap() and save it yourself"
        )
    plain = merge_and_unwrap(model, inplace=inplace)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        plain.save_pretrained(str(tmp), safe_serialization=safe_serialization)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out)
