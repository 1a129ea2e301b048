r"""Merged export: fold every ΔW into its base weight and save a plain transformers model.

LoRA's deployment argument (Hu et al. 2021, §4.1): ``W = W0 + ΔW`` can be computed once, so the
adapted model runs with **no extra inference latency** and no adarank code. Here each
:class:`~adarank.modules.SVDLoRALinear` is merged (in float32, cast back to the base dtype, see
``SVDLoRALinear.merge``) and then replaced by its own base ``nn.Linear`` / ``Conv1D``, so the model
is the original transformers architecture again and ``save_pretrained`` writes a directory that
``AutoModel*.from_pretrained`` loads with plain ``transformers``. A data-aware init's shift is
already inside the base weight (``W0 − shift``), so the merged weight is ``W0 − shift + ΔW``.

A quantized base (``model.quantization``, bitsandbytes) cannot take ΔW in place: every quantized
linear layer, adapted or not, is first replaced by a plain ``nn.Linear`` holding its dequantized
weight in the export dtype (:func:`adarank.models.quantization.dequantize_linears`), so the
merged model computes what the adapted quantized model computed, without bitsandbytes.
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
from adarank.modules.svd_lora import is_quantized

__all__ = ["merge_and_unwrap", "export_merged"]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    from adarank.models.llm import DTYPES

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r}: expected one of {list(DTYPES)}")
    return DTYPES[dtype]


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's unquantized frozen floating-point parameters (float32 if none)."""
    adapters = {id(p) for layer in adapter_layers(model).values() for p in layer.parameters()}
    for p in model.parameters():
        if id(p) not in adapters and p.is_floating_point() and not hasattr(p, "quant_state"):
            return p.dtype
    return torch.float32


def merge_and_unwrap(
    model: nn.Module, *, inplace: bool = False, dtype: str | torch.dtype | None = None
) -> nn.Module:
    """Return ``model`` with every adapter merged into its base layer and the wrapper removed.

    Args:
        model: a model with adarank adapters.
        inplace: modify ``model`` itself (saves memory when the model is loaded only to be
            exported); by default a deep copy is merged and ``model`` is left unchanged.
        dtype: dtype of the merged model (a ``torch.dtype`` or ``"float32"``, ``"bfloat16"``,
            ``"float16"``); None keeps the base dtypes. Quantized layers are dequantized into
            it (None: the dtype of the model's unquantized parts, its compute dtype).

    Returns:
        the plain model (no :class:`SVDLoRALinear`, no quantized layer left).

    Raises:
        ValueError: the model has no adapter layers, an unknown dtype, or a merged weight is
            not finite.
    """
    dtype = _resolve_dtype(dtype)
    if not adapter_layers(model):
        raise ValueError(
            "the model has no adarank adapter layers to merge (was the adapter loaded?)"
        )
    if not inplace:
        model = copy.deepcopy(model)
    if any(isinstance(m, nn.Linear) and is_quantized(m) for m in model.modules()):
        from adarank.models.quantization import dequantize_linears

        dequantize_linears(model, dtype or _float_dtype(model))
    for name, layer in adapter_layers(model).items():
        if dtype is not None:  # merge in the export dtype (not in a coarser base dtype)
            layer.base_layer.to(dtype)
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
    if dtype is not None:
        model = model.to(dtype)
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
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write a merged ``save_pretrained`` directory (plus the tokenizer when given).

    Args:
        model: a transformers ``PreTrainedModel`` with adarank adapters.
        out: output directory (written atomically).
        tokenizer: saved next to the model when given, so the directory is self-contained.
        overwrite: replace a non-empty ``out``.
        inplace: merge ``model`` itself instead of a copy (see :func:`merge_and_unwrap`).
        safe_serialization: write ``model.safetensors`` (default) rather than a pickle.
        dtype: dtype of the written weights (see :func:`merge_and_unwrap`; None: the base's).

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
    plain = merge_and_unwrap(model, inplace=inplace, dtype=dtype)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        plain.save_pretrained(str(tmp), safe_serialization=safe_serialization)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out)
