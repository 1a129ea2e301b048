r"""Export an adarank adapter as a PEFT LoRA adapter directory.

PEFT's LoRA layer computes ``y = W0 x + (α_l / r_l) · B A x`` (Hu et al. 2021, §4.1) with a
per-layer rank ``r_l`` (``rank_pattern``) and alpha ``α_l`` (``alpha_pattern``). Each adarank
layer's total update relative to the original base weight (``scaling · P diag(λ) Q − shift``,
see :mod:`adarank.export.factors`) has rank ``k_l = rank + shift rank`` and is written as::

    r_l = α_l = k_l   (PEFT scaling 1),   B = P · diag(scaling · λ, −1, …),   A = [Q ; shift_Q]

so ``PeftModel.from_pretrained(original_base, DIR)`` reproduces adarank's outputs exactly.
Layers whose update has rank 0 are left out of ``target_modules``; Conv1D layers (GPT-2) get
``fan_in_fan_out=True``; ``modules_to_save`` (e.g. the classifier head) are written the way
PEFT 0.21 saves them, ``base_model.model.<module>.<param>``, and listed in the config, so PEFT
wraps them in its ``ModulesToSaveWrapper`` and loads the trained values.

PEFT is an optional dependency: it is imported inside the functions.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import save_file
from torch import nn

from adarank.export.dirs import atomic_directory
from adarank.export.factors import total_update_factors
from adarank.export.model_card import CARD_NAME, base_model_id, model_card
from adarank.modules import adapter_layers
from adarank.modules.inject import saved_modules

__all__ = ["PEFT_PREFIX", "PEFT_WEIGHTS_NAME", "require_peft", "peft_state", "export_peft"]

#: prefix of every key in a saved PEFT adapter (PeftModel → LoraModel → wrapped model)
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def require_peft() -> ModuleType:
    """Import ``peft`` or raise an ImportError that says how to install it."""
    try:
        import peft
    except ImportError as err:  # pragma: no cover - exercised only without peft
        raise ImportError(
            "PEFT export/import needs the optional dependency 'peft' "
            "(pip install 'adarank[peft]' or pip install peft)"
        ) from err
    return peft


def peft_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """Build the PEFT LoRA tensors and config fields for ``model``'s adapters.

    Args:
        model: a model with adarank adapters (merged or not).

    Returns:
        ``(tensors, fields)``: the ``adapter_model.safetensors`` content (float32 LoRA factors,
        saved modules in their own dtype) and a dict with ``ranks`` ({layer: k_l}, rank-0 layers
        excluded), ``skipped`` (rank-0 layer names), ``modules_to_save``, ``fan_in_fan_out`` and
        ``dropout``.

    Raises:
        ValueError: the model has no adapters, or every layer has rank 0 (nothing to export as
            LoRA; use the merged or native format).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adarank adapter layers to export")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    skipped: list[str] = []
    conv1d = False
    dropout = 0.0
    for name, layer in layers.items():
        P, lam, Q = total_update_factors(layer)
        if lam.numel() == 0:
            skipped.append(name)
            continue
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = Q  # (k, d_in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = P * lam  # (d_out, k)
        ranks[name] = int(lam.numel())
        conv1d = conv1d or layer.transposed
        if isinstance(layer.dropout, nn.Dropout):
            dropout = max(dropout, float(layer.dropout.p))
    if not ranks:
        raise ValueError(
            f"all {len(layers)} adapter layers have rank 0: there is no LoRA update to export "
            "(PEFT needs r ≥ 1); use --format merged or --format adapter"
        )
    saved = saved_modules(model)
    for mod_name in saved:
        for pname, p in model.get_submodule(mod_name).named_parameters():
            tensors[f"{PEFT_PREFIX}{mod_name}.{pname}"] = p.detach()
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fields = {
        "ranks": ranks,
        "skipped": skipped,
        "modules_to_save": saved,
        "fan_in_fan_out": conv1d,
        "dropout": dropout,
    }
    return tensors, fields


def export_peft(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    overwrite: bool = False,
    param_budget: int | None = None,
    rank_figure: str | os.PathLike | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write a PEFT LoRA adapter directory equivalent to ``model``'s adarank adapter.

    Load it with ``peft.PeftModel.from_pretrained(base, out)`` where ``base`` is the original
    pretrained model (before any adarank init shifted its weights). The directory also holds a
    model card ``README.md`` (:mod:`adarank.export.model_card`) and, when given, the rank figure;
    files are written with the usual permissions (0644 files, 0755 directories under umask 022).

    Args:
        model: a transformers model with adarank adapters.
        out: output directory (written atomically).
        base_model_name_or_path: recorded in ``adapter_config.json``; defaults to the model's
            ``config._name_or_path`` when set. Built-ins (``"smollm2"``, ``"minilm"``, or the
            directory they load from) are recorded as their Hub ids; other names as given.
        task_type: PEFT task type (e.g. ``"SEQ_CLS"``, ``"CAUSAL_LM"``) or None for a plain
            ``PeftModel``.
        overwrite: replace a non-empty ``out``.
        param_budget: the training run's parameter budget, stated in the model card.
        rank_figure: an image of the rank trajectory (e.g. a run's ``rank_heatmap.png``), copied
            next to the card and shown in it.
        notes: extra sentences for the card's notes section.

    Returns:
        the output directory.

    Raises:
        ImportError: ``peft`` is not installed.
        ValueError: see :func:`peft_state`.
    """
    peft = require_peft()
    tensors, fields = peft_state(model)
    ranks: dict[str, int] = fields["ranks"]
    r_default = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: k for name, k in ranks.items() if k != r_default}
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    base_model_name_or_path = base_model_id(base_model_name_or_path)
    if rank_figure is not None and not Path(rank_figure).is_file():
        raise FileNotFoundError(f"rank_figure {str(rank_figure)!r} does not exist")
    figure = None if rank_figure is None else f"rank_heatmap{Path(rank_figure).suffix}"
    card = model_card(
        model,
        base_model=base_model_name_or_path,
        param_budget=param_budget,
        task_type=task_type,
        rank_figure=figure,
        notes=notes,
    )
    config = peft.LoraConfig(
        r=r_default,
        lora_alpha=r_default,  # α = r → PEFT scaling α/r = 1; adarank's scaling is inside B
        target_modules=sorted(ranks),
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        lora_dropout=fields["dropout"],
        fan_in_fan_out=fields["fan_in_fan_out"],
        bias="none",
        modules_to_save=fields["modules_to_save"] or None,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path or None,
        inference_mode=True,
    )
    auto_mapping = None
    if task_type is None:
        auto_mapping = {
            "base_model_class": type(model).__name__,
            "parent_library": type(model).__module__,
        }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp), auto_mapping_dict=auto_mapping)
        save_file(tensors, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CARD_NAME).write_text(card, encoding="utf-8")
        if figure is not None:
            shutil.copyfile(rank_figure, tmp / figure)
    return Path(out)
