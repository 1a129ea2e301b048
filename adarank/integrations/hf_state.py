"""What :class:`~adarank.integrations.transformers.AdaRankCallback` adds to a Trainer checkpoint.

``checkpoint-N/`` of a Trainer run with the callback holds, besides the Trainer's own files:

    adarank_adapter/     native adapter files of step N (``adarank.load_adapter``)
    adarank_state.pt     ``torch.load(weights_only=True)``: version, global_step, param_budget,
                         base_params, layers {name: d_out, d_in, rank, shift_rank}, controller
                         (``RankController.state_dict()``)

Adapter tensors are stored at their live rank, so a model must be resized to the checkpoint's
ranks before its weights load: :func:`resize_before_load` does it as a ``load_state_dict``
pre-hook (the Trainer's own ``resume_from_checkpoint`` and ``load_best_model_at_end`` loads).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adarank.modules import adapter_layers, resize_to

__all__ = [
    "ADAPTER_DIR",
    "STATE_NAME",
    "STATE_VERSION",
    "check_state",
    "layer_info",
    "read_state",
    "resize_before_load",
    "resize_layers",
]

#: sub-directory of ``checkpoint-N/`` with the native adapter files (``adarank.load_adapter``)
ADAPTER_DIR = "adarank_adapter"
#: file of ``checkpoint-N/`` with the allocation state (``torch.load(weights_only=True)``)
STATE_NAME = "adarank_state.pt"
STATE_VERSION = 1


def layer_info(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{layer: {"d_out", "d_in", "rank", "shift_rank"}}`` of ``model``'s adapters."""
    return {
        name: {
            "d_out": layer.d_out,
            "d_in": layer.d_in,
            "rank": layer.rank,
            "shift_rank": int(layer.shift_P.shape[1]),
        }
        for name, layer in adapter_layers(model).items()
    }


def resize_layers(model: nn.Module, ranks: Mapping[str, int], shifts: Mapping[str, int]) -> None:
    """Give every adapter layer the shapes of a saved state (values are loaded afterwards)."""
    resize_to(model, dict(ranks))
    layers = adapter_layers(model)
    for name, k in shifts.items():
        layer = layers[name]
        if layer.shift_P.shape[1] != k:
            kw = {"device": layer.shift_P.device, "dtype": layer.shift_P.dtype}
            layer.shift_P = torch.zeros(layer.d_out, k, **kw)
            layer.shift_Q = torch.zeros(k, layer.d_in, **kw)


def resize_before_load(model: nn.Module, state_dict: Mapping, prefix: str, *_: Any) -> None:
    """``load_state_dict`` pre-hook: resize adapter layers to the ranks of the incoming tensors.

    Adapter tensors are stored at their live rank, so a Trainer checkpoint taken after pruning
    or growth only loads into layers of the same ranks.
    """
    ranks, shifts = {}, {}
    for name, layer in adapter_layers(model).items():
        lam = state_dict.get(f"{prefix}{name}.lora_lambda")
        if torch.is_tensor(lam) and lam.dim() == 1 and lam.shape[0] != layer.rank:
            ranks[name] = int(lam.shape[0])
        shift = state_dict.get(f"{prefix}{name}.shift_P")
        if torch.is_tensor(shift) and shift.dim() == 2:
            shifts[name] = int(shift.shape[1])
    if ranks or shifts:
        resize_layers(model, ranks, shifts)


def read_state(checkpoint_dir: str | os.PathLike) -> dict:
    """Read ``checkpoint_dir/adarank_state.pt`` written by :class:`AdaRankCallback`.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not an adarank state of a known version.
    """
    path = Path(checkpoint_dir) / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: not a checkpoint written with adarank's AdaRankCallback"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a bad checkpoint
        raise ValueError(f"cannot read {path} (truncated or corrupt?): {err}") from err
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise ValueError(f"{path}: unknown adarank state version {version!r}")
    return state


def check_state(state: dict, model: nn.Module, param_budget: int, path: Path) -> None:
    """Raise ValueError if ``state`` is from another model (adapter layers) or budget."""
    saved, mine = state.get("layers") or {}, layer_info(model)
    shapes = {n: (c["d_out"], c["d_in"]) for n, c in mine.items()}
    theirs = {n: (c.get("d_out"), c.get("d_in")) for n, c in saved.items()}
    diff = sorted(n for n in set(shapes) | set(theirs) if shapes.get(n) != theirs.get(n))
    if diff:
        raise ValueError(f"{path} is from another model: adapter layers differ {diff[:5]}")
    if state.get("param_budget") != param_budget:
        raise ValueError(
            f"{path} was trained with param_budget={state.get('param_budget')} but this "
            f"callback has param_budget={param_budget}; resume with the same budget"
        )
