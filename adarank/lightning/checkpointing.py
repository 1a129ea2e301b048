"""What an ``AdaRankModule`` adds to Lightning checkpoints, and how it is restored.

Lightning restores a checkpoint in this order (``Trainer._run``): ``on_load_checkpoint`` →
``load_state_dict`` → ``configure_optimizers`` → optimizer/scheduler/loop states. Adapter
tensors are stored at their live rank, so before the state dict can be loaded every layer is
resized (:func:`restore_layers`) to the rank recorded in the checkpoint; the controller's state is
handed back to the module, which loads it once ``configure_optimizers`` has built the controller.

Checkpoints hold only what training changes. ``checkpoint["state_dict"]`` keeps every tensor of
the module except the frozen base parameters (:func:`trainable_state_dict`): adapter factors,
``shift_P`` / ``shift_Q`` and any other adapter-layer state, the ``modules_to_save``, and the
buffers; the optimizer, scheduler, loop, data-loader and RNG states come with them. Resuming
rebuilds the base from the run's ``model.*`` config, and :func:`restore_layers` compares it with
the fingerprint stored at save time (:mod:`adarank.modules.base_fingerprint`; a different base
is a ``ValueError`` naming the layers). ``AdaRankModule.load_state_dict`` accepts a state dict
whose only missing keys are frozen base parameters (:func:`check_state_dict`). Checkpoints of
format 1, which also hold the base, still load (their base weights are loaded as saved).

Checkpoint entry ``checkpoint["adarank"]``::

    version          format version (2; 1: base weights in the state dict, no fingerprint)
    layers           {name: {"d_out", "d_in", "max_rank", "rank", "shift_rank"}}
    param_budget     resolved final budget (None: allocation off)
    base_params      frozen base-model parameters
    base             "omitted": the frozen base parameters are not in the state dict
    base_fingerprint :func:`~adarank.modules.base_fingerprint.base_fingerprint` of the adapted
                     layers (their original weights W0)
    controller       RankController.state_dict() (None before configure_optimizers / allocation off)
    guard            NonFiniteGuard.state_dict(): skipped steps, loss of the first step

Checkpoint entry ``checkpoint["adarank_rng"]`` (:func:`rng_state`): the global RNG states at
the save, restored by the module in ``on_train_start`` (after sanity checking and data setup,
before the first resumed batch), so dropout continues as in an uninterrupted run.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from adarank.modules import adapter_layers
from adarank.modules.base_fingerprint import base_fingerprint, differing_layers

__all__ = [
    "KEY",
    "RNG_KEY",
    "adarank_state",
    "base_fingerprint_of",
    "check_state_dict",
    "check_strategy",
    "frozen_keys",
    "reconcile_stopped_epoch",
    "restore_layers",
    "rng_state",
    "set_rng_state",
    "trainable_state_dict",
]

KEY = "adarank"
RNG_KEY = "adarank_rng"
VERSION = 2
#: formats :func:`restore_layers` reads (1: the state dict holds the base weights)
READABLE_VERSIONS = (1, 2)
#: attribute of the LightningModule that holds the adapted model
MODEL_ATTR = "model"


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


def frozen_keys(pl_module: pl.LightningModule) -> set[str]:
    """State-dict keys of the frozen base parameters (``requires_grad=False``, not an adapter).

    Tied parameters count under every name the state dict uses for them.
    """
    adapter = {
        id(p)
        for layer in adapter_layers(getattr(pl_module, MODEL_ATTR)).values()
        for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q)
    }
    return {
        name
        for name, p in pl_module.named_parameters(remove_duplicate=False)
        if not p.requires_grad and id(p) not in adapter
    }


def trainable_state_dict(pl_module: pl.LightningModule, state_dict: dict) -> dict:
    """``state_dict`` without the frozen base parameters (what a checkpoint stores)."""
    frozen = frozen_keys(pl_module)
    return type(state_dict)((k, v) for k, v in state_dict.items() if k not in frozen)


def base_fingerprint_of(pl_module: pl.LightningModule) -> dict:
    """Fingerprint of the original base weights of the adapted layers (computed once).

    The original weights W0 do not change during training (shifts and merges are undone by
    the fingerprint itself), so the record is cached on the module.
    """
    cached = getattr(pl_module, "_adarank_base_fingerprint", None)
    if cached is None:
        model = getattr(pl_module, MODEL_ATTR)
        cached = base_fingerprint(model, list(adapter_layers(model)))
        pl_module._adarank_base_fingerprint = cached
    return cached


def adarank_state(pl_module: pl.LightningModule) -> dict[str, Any]:
    """The ``checkpoint["adarank"]`` entry for ``pl_module`` (see module docstring)."""
    controller = pl_module.controller
    return {
        "version": VERSION,
        "layers": _layer_info(pl_module),
        "param_budget": pl_module.param_budget,
        "base_params": pl_module.base_params,
        "base": "omitted",
        "base_fingerprint": base_fingerprint_of(pl_module),
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
    if state.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"adarank checkpoint version {state.get('version')!r}, expected one of "
            f"{list(READABLE_VERSIONS)}"
        )
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
    omitted = state.get("base") == "omitted"
    if omitted:
        _check_base(pl_module, state.get("base_fingerprint"))
    saved = checkpoint.get("state_dict")
    for name, info in state["layers"].items():
        layer = layers[name]
        layer.set_rank(int(info["rank"]))
        k = int(info.get("shift_rank", 0))
        if omitted and isinstance(saved, dict):
            _restore_shift(layer, saved, name, k)
        elif layer.shift_P.shape[1] != k:  # shapes only; values come from the state dict
            _zero_shift(layer, k)
    return state.get("controller")


def _zero_shift(layer, k: int) -> None:
    layer.shift_P = torch.zeros(layer.d_out, k, device=layer.shift_P.device)
    layer.shift_Q = torch.zeros(k, layer.d_in, device=layer.shift_Q.device)


def _restore_shift(layer, state_dict: dict, name: str, k: int) -> None:
    """Give the rebuilt base the checkpoint's shift (``W0 − shift_P shift_Q``).

    The base weights are not in the checkpoint: the rebuilt layer keeps its weights when its
    shift already equals the saved one (a deterministic init: bit-identical), else its own
    shift is undone and the saved one applied.
    """
    from adarank.modules.adapter_io import _apply_shift

    P = state_dict.get(f"{MODEL_ATTR}.{name}.shift_P")
    Q = state_dict.get(f"{MODEL_ATTR}.{name}.shift_Q")
    if not (torch.is_tensor(P) and torch.is_tensor(Q)) or (
        tuple(P.shape) != (layer.d_out, k) or tuple(Q.shape) != (k, layer.d_in)
    ):
        if layer.shift_P.shape[1] != k:  # check_state_dict names the missing / bad tensor
            _zero_shift(layer, k)
        return
    dev = layer.shift_P.device
    P, Q = P.to(dev, layer.shift_P.dtype), Q.to(dev, layer.shift_Q.dtype)
    same = layer.shift_P.shape == P.shape and layer.shift_Q.shape == Q.shape
    if same and torch.equal(layer.shift_P, P) and torch.equal(layer.shift_Q, Q):
        return
    _apply_shift(layer, P, Q)


def _check_base(pl_module: pl.LightningModule, record: Any) -> None:
    """Raise if the model's original base weights differ from the checkpoint's fingerprint."""
    if not isinstance(record, dict):
        raise ValueError(
            "the checkpoint omits the frozen base weights but has no 'base_fingerprint' to check "
            "the rebuilt base against (damaged checkpoint?)"
        )
    if getattr(pl_module, "_adarank_verified_base", None) == record:
        return  # already checked (the resume pre-flight, then Lightning's restore)
    model = getattr(pl_module, MODEL_ATTR)
    names = list(adapter_layers(model))
    differ = differing_layers(record, model, names, "the checkpoint's adarank entry")
    if differ:
        shown = ", ".join(
            f"{n!r} (‖W0‖ at training {a:.6g}, rebuilt {b:.6g})" for n, a, b in differ[:3]
        )
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise ValueError(
            "the base model rebuilt from the config (model.*) is not the one this checkpoint "
            f"was trained on: {len(differ)} of {len(names)} adapted layer(s) have other "
            f"weights: {shown}{more}. Checkpoints store only what training changes, so a "
            "resume needs the same base weights (the same model files, dtype and seed)"
        )
    pl_module._adarank_verified_base = record
    pl_module._adarank_base_fingerprint = record  # later saves record the same base


def check_state_dict(pl_module: pl.LightningModule, state_dict: Any) -> str:
    """Differences between a checkpoint's ``state_dict`` and ``pl_module``'s ("" if none).

    The frozen base parameters (:func:`frozen_keys`) may be absent: checkpoints omit them.
    Call after :func:`restore_layers` (adapter tensors are stored at their live rank).
    """
    if not isinstance(state_dict, dict):
        return f"'state_dict' is {type(state_dict).__name__}, not a mapping of tensors"
    own = pl_module.state_dict()
    missing = sorted(set(own) - set(state_dict) - frozen_keys(pl_module))
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

    Sharded strategies that own the trainable parameters flatten or shard them at wrap time;
    pruning and growing replace ``nn.Parameter`` objects, which those cannot follow.
    ``ShardedBaseStrategy`` (``"sharded_base"``) shards only the frozen base and keeps the
    adapters replicated, so it is allowed. Fixed-rank training (``budget=None``) is allowed
    under any strategy.

    Raises:
        ValueError: allocation requested under an unsupported strategy.
    """
    if not allocation:
        return
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    from adarank.lightning.sharded import STRATEGY_NAME, ShardedBaseStrategy

    strategy = trainer.strategy
    allowed = (DDPStrategy, SingleDeviceStrategy, ShardedBaseStrategy)
    # DeepSpeedStrategy subclasses DDPStrategy but shards the trainable parameters
    if isinstance(strategy, allowed) and not isinstance(strategy, DeepSpeedStrategy):
        return
    raise ValueError(
        f"rank allocation (budget set) is not supported with {type(strategy).__name__}: it "
        "replaces adapter parameters during training, which sharded strategies (FSDP, "
        "DeepSpeed) cannot follow. Use strategy='ddp' (adapters are small, so replicating them "
        f"costs little), strategy={STRATEGY_NAME!r} (shards the frozen base, replicates the "
        "adapters), or train at fixed ranks with budget=None."
    )


def reconcile_stopped_epoch(checkpoint: dict[str, Any]) -> bool:
    """Make the checkpoint written when a run stopped resume like one written during training.

    Lightning's loop counters differ between a checkpoint saved in ``on_train_batch_end``
    during training (the periodic ``last.ckpt``; the SIGKILL-resume tests show it continues
    exactly) and the one saved after ``trainer.fit`` stopped (``max_steps`` or ``max_epochs``
    reached): in the latter the last batch and the epoch are already counted as completed
    (``completed = ready``). Extending a stopped run (``fit --resume RUN trainer.max_steps=N``)
    from those counters labels the rest of the interrupted epoch with the next epoch's number,
    or repeats a batch when it stopped on an epoch boundary, so every later batch differs from
    an uninterrupted run. This rewrites the stopped form to the in-training form at the same
    position: the epoch in progress (``processed = completed = ready - 1``), the last batch
    not yet completed, ``_batches_that_stepped`` one lower (Lightning adds it back on restart).
    Returns whether anything changed.
    """
    fit = (checkpoint.get("loops") or {}).get("fit_loop")
    if not isinstance(fit, dict):
        return False
    epochs = fit.get("epoch_progress") or {}
    batches = fit.get("epoch_loop.batch_progress") or {}
    ep, bp = epochs.get("current") or {}, batches.get("current") or {}
    stopped = (
        ep.get("ready", 0) > 0
        and ep.get("processed") == ep.get("completed") == ep.get("ready")
        and bp.get("ready", 0) > 0
        and bp.get("completed") == bp.get("ready")
    )
    if not stopped:
        return False
    for counter in (epochs.get("current"), epochs.get("total")):
        counter["processed"] -= 1
        counter["completed"] -= 1
    for counter in (batches.get("current"), batches.get("total")):
        counter["completed"] -= 1
    state = fit.get("epoch_loop.state_dict")
    if isinstance(state, dict) and state.get("_batches_that_stepped", 0) > 0:
        state["_batches_that_stepped"] -= 1
    return True


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
