"""What an ``AdaRankModule`` adds to Lightning checkpoints, and how it is restored.

Lightning restores a checkpoint in this order (``Trainer._run``): ``on_load_checkpoint`` →
``load_state_dict`` → ``configure_optimizers`` → optimizer/scheduler/loop states. Adapter
tensors are stored at their live rank, so before the state dict can be loaded every layer is
resized (:func:`restore_layers`) to the rank recorded in the checkpoint; the controller's state is
handed back to the module, which loads it once ``configure_optimizers`` has built the controller.

Checkpoint entry ``checkpoint["adarank"]``::

    version        format version (1)
    layers         {name: {"d_out", "d_in", "max_rank", "rank", "shift_rank"}}
    param_budget   resolved final budget (None: allocation off)
    base_params    frozen base-model parameters
    controller     RankController.state_dict() (None before configure_optimizers / allocation off)
    guard          NonFiniteGuard.state_dict(): skipped steps, loss of the first step

Checkpoint entry ``checkpoint["adarank_rng"]`` (:func:`rng_state`): the global RNG states at
the save, restored by the module in ``on_train_start`` (after sanity checking and data setup,
before the first resumed batch), so dropout continues as in an uninterrupted run.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from adarank.modules import adapter_layers

__all__ = [
    "KEY",
    "RNG_KEY",
    "adarank_state",
    "check_state_dict",
    "check_strategy",
    "restore_layers",
    "rng_state",
    "set_rng_state",
]

KEY = "adarank"
RNG_KEY = "adarank_rng"
VERSION = 1


def _layer_info(pl_module: pl.LightningModule) -> dict[str, dict[str, int]]:
    return {
        name: {
            "d_out": layer.d_out,
            "d_in": layer.d_in,
            "max_rank": layer.max_rank,
            "rank": layer.rank,
            "shift_rank": int(layer.shift_P.shape[1]),
        }
        for name, layer in adapter_layers(pl_module.model).items()
    }


def adarank_state(pl_module: pl.LightningModule) -> dict[str, Any]:
    """The ``checkpoint["adarank"]`` entry for ``pl_module`` (see module docstring)."""
    controller = pl_module.controller
    return {
        "version": VERSION,
        "layers": _layer_info(pl_module),
        "param_budget": pl_module.param_budget,
        "base_params": pl_module.base_params,
        "controller": None if controller is None else controller.state_dict(),
        "guard": pl_module.guard.state_dict() if hasattr(pl_module, "guard") else None,
    }


def _describe_mismatch(saved: dict, current: dict) -> str:
    missing = sorted(set(saved) - set(current))
    extra = sorted(set(current) - set(saved))
    lines = []
    if missing:
        lines.append(f"adapter layers in the checkpoint but not in the model: {missing[:10]}")
    if extra:
        lines.append(f"adapter layers in the model but not in the checkpoint: {extra[:10]}")
    for name in sorted(set(saved) & set(current)):
        s, c = saved[name], current[name]
        shape_s = (s["d_out"], s["d_in"], s["max_rank"])
        shape_c = (c["d_out"], c["d_in"], c["max_rank"])
        if shape_s != shape_c:
            lines.append(
                f"layer {name!r}: checkpoint (d_out, d_in, max_rank)={shape_s}, model {shape_c}"
            )
    return "; ".join(lines[:12])


def restore_layers(pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> dict | None:
    """Check the checkpoint matches ``pl_module`` and resize its layers to the saved ranks.

    Returns:
        the saved controller state (or None), to load once the controller exists.

    Raises:
        ValueError: the checkpoint has no adarank entry, comes from a different model (layer
            names or shapes), or was trained for a different budget.
    """
    state = checkpoint.get(KEY)
    if not isinstance(state, dict) or "layers" not in state:
        raise ValueError(
            "this checkpoint was not written by adarank.AdaRankModule (no 'adarank' entry); "
            "load plain weights with adarank.load_adapter or torch instead"
        )
    if state.get("version") != VERSION:
        raise ValueError(f"adarank checkpoint version {state.get('version')!r}, expected {VERSION}")
    current = _layer_info(pl_module)
    mismatch = _describe_mismatch(state["layers"], current)
    if mismatch:
        raise ValueError(f"checkpoint does not match this model's adapters: {mismatch}")
    if state.get("param_budget") != pl_module.param_budget:
        raise ValueError(
            f"checkpoint was trained with param_budget={state.get('param_budget')} but this module "
            f"has param_budget={pl_module.param_budget}; resume with the same budget (or start a "
            "new run and load only the adapter with adarank.load_adapter)"
        )
    layers = adapter_layers(pl_module.model)
    for name, info in state["layers"].items():  # ranks are ints ≤ max_rank (shapes checked)
        if not isinstance(info.get("rank"), int) or not 0 <= info["rank"] <= layers[name].max_rank:
            raise ValueError(f"checkpoint layer {name!r}: rank {info.get('rank')!r} is invalid")
    for name, info in state["layers"].items():
        layer = layers[name]
        layer.set_rank(int(info["rank"]))
        k = int(info.get("shift_rank", 0))
        if layer.shift_P.shape[1] != k:  # shapes only; values come from the state dict
            layer.shift_P = torch.zeros(layer.d_out, k, device=layer.shift_P.device)
            layer.shift_Q = torch.zeros(k, layer.d_in, device=layer.shift_Q.device)
    return state.get("controller")


def check_state_dict(pl_module: pl.LightningModule, state_dict: Any) -> str:
    """Differences between a checkpoint's ``state_dict`` and ``pl_module``'s ("" if none).

    Call after :func:`restore_layers` (adapter tensors are stored at their live rank).
    """
    if not isinstance(state_dict, dict):
        return f"'state_dict' is {type(state_dict).__name__}, not a mapping of tensors"
    own = pl_module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    extra = sorted(set(state_dict) - set(own))
    lines = []
    if missing:
        lines.append(f"{len(missing)} tensors missing from the checkpoint (e.g. {missing[:3]})")
    if extra:
        lines.append(f"{len(extra)} tensors not in this model (e.g. {extra[:3]})")
    for key in sorted(set(own) & set(state_dict)):
        saved = state_dict[key]
        if not torch.is_tensor(saved):
            lines.append(f"{key}: a {type(saved).__name__}, not a tensor")
        elif tuple(saved.shape) != tuple(own[key].shape):
            lines.append(
                f"{key}: checkpoint shape {tuple(saved.shape)}, model {tuple(own[key].shape)}"
            )
        if len(lines) >= 6:
            break
    return "; ".join(lines)


def check_strategy(trainer: pl.Trainer, allocation: bool) -> None:
    """Reject strategies that cannot follow parameter replacement (FSDP, DeepSpeed).

    Sharded strategies flatten parameters into shared buffers at wrap time; pruning and growing
    replace ``nn.Parameter`` objects, which those buffers cannot follow. Fixed-rank training
    (``budget=None``) is allowed under any strategy.

    Raises:
        ValueError: allocation requested under an unsupported strategy.
    """
    if not allocation:
        return
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    if isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)):
        return
    raise ValueError(
        f"rank allocation (budget set) is not supported with {type(strategy).__name__}: it "
        "replaces adapter parameters during training, which sharded strategies (FSDP, "
        "DeepSpeed) cannot follow. Use strategy='ddp' (adapters are small, so replicating them "
        "costs little), or train at fixed ranks with budget=None."
    )


def rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU/CUDA, ``random``, numpy) as ``weights_only``-safe values.

    Stored as ``checkpoint["adarank_rng"]`` so that a resumed run draws the same dropout masks
    as an uninterrupted one (Lightning does not checkpoint the global RNGs).
    """
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), py_gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNGs from :func:`rng_state`'s output (CUDA only when saved and present)."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
