"""Optimizer and learning-rate schedule for adapter training.

Parameter groups (named, so the allocation engine and users can find them):

* ``"adapter"`` — ``lora_P`` and ``lora_Q`` of every :class:`~adarank.modules.SVDLoRALinear`
  (learning rate ``lr``, weight decay ``weight_decay``);
* ``"adapter_lambda"`` — the singular values ``lora_lambda`` (``lr``; weight decay
  ``lambda_weight_decay``, 0 by default). Decoupled (AdamW) decay on λ bounds every singular value
  whatever the learning rate: Adam moves λ by at most about ``lr`` per step and the decay pulls it
  back by ``lr · wd · λ``, so |λ| settles below ≈ 1/wd and each singular value of ΔW below
  ≈ scaling/wd (docs/theory.md, "A learning-rate-free bound on ΔW");
* ``"head"`` — every other trainable parameter, i.e. the ``modules_to_save`` (``head_lr``;
  weight decay on matrices only, not on biases/norms).

The optimizer is a built-in name (:data:`OPTIMIZERS`) or the dotted import path of any
``torch.optim.Optimizer`` class (``"torch.optim.RAdam"``, a recipe's ``optimizer._component_``),
called as ``cls(param_groups, lr=lr, **optimizer_args)``: the groups above always apply.

The default learning-rate schedule is linear warm-up over ``warmup_ratio · total_steps``
optimizer steps, then linear decay to 0 — a pure function of the optimizer step, stepped once
per optimizer step. :func:`build_lr_scheduler` builds any other scheduler from its import path
(``lr_scheduler._component_``), also stepped once per optimizer step.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from adarank.modules import adapter_layers

__all__ = [
    "OPTIMIZERS",
    "SCHEDULER_STEP_ARGS",
    "build_lr_scheduler",
    "build_optimizer",
    "component_path",
    "import_component",
    "linear_warmup_decay",
    "param_groups",
]

#: built-in optimizer names → (class path, default keyword arguments)
_BUILTIN: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("torch.optim.AdamW", {}),
    "adam": ("torch.optim.Adam", {}),  # L2 penalty (coupled), as torch.optim.Adam defines it
    "sgd": ("torch.optim.SGD", {"momentum": 0.9}),
}
OPTIMIZERS = tuple(_BUILTIN)
#: scheduler arguments that receive the run's number of optimizer steps unless given
SCHEDULER_STEP_ARGS = ("total_steps", "num_training_steps", "T_max")
#: arguments an optimizer component may not take from its arguments (set through the groups)
_GROUP_ARGS = ("params", "lr", "weight_decay")


def import_component(
    path: str,
    field: str,
    *,
    example: str = "torch.optim.AdamW",
    error: type[ValueError] = ValueError,
) -> Callable:
    """The callable at dotted import ``path`` (e.g. ``"torch.optim.AdamW"``).

    The one importer of ``_component_`` paths (the config layer's ``get_component`` calls it
    with ``error=ConfigError``).

    Raises:
        ``error``: not a dotted path, module not importable, or no callable of that name.
    """
    if not isinstance(path, str) or "." not in path:
        raise error(f"{field}={path!r}: expected a dotted import path like {example}")
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise error(f"{field}={path!r}: cannot import module {module_name!r} ({err})") from err
    obj = getattr(module, attr, None)
    if obj is None or not callable(obj):
        raise error(f"{field}={path!r}: module {module_name!r} has no callable {attr!r}")
    return obj


def component_path(component: str | Callable, field: str) -> str:
    """A built-in name or dotted path, unchanged; a class or function as its import path.

    Hyper-parameters and checkpoints keep the string (checkpoints load with
    ``weights_only=True``, which cannot restore classes).

    Raises:
        ValueError / TypeError: the object cannot be imported back from its path.
    """
    if isinstance(component, str):
        return component
    if isinstance(component, functools.partial):
        raise TypeError(
            f"{field}={component!r}: give the class or its import path and its arguments "
            "separately (optimizer_args / lr_scheduler_args), not a functools.partial"
        )
    path = f"{getattr(component, '__module__', '')}.{getattr(component, '__qualname__', '')}"
    try:
        same = import_component(path, field) is component
    except ValueError:
        same = False
    if not same:
        raise TypeError(f"{field}={component!r}: expected an importable class or function")
    return path


def _accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    head_lr: float | None = None,
    weight_decay: float = 0.0,
    lambda_weight_decay: float = 0.0,
) -> list[dict]:
    """Split trainable parameters into the named groups described in the module docstring.

    Empty groups are dropped. Rank-0 layers contribute empty (0-element) tensors, which keeps
    the group layout stable while ranks change.
    """
    head_lr = lr if head_lr is None else head_lr
    pq, lam = [], []
    adapter_ids: set[int] = set()
    for layer in adapter_layers(model).values():
        pq += [layer.lora_P, layer.lora_Q]
        lam.append(layer.lora_lambda)
        adapter_ids |= {id(layer.lora_P), id(layer.lora_Q), id(layer.lora_lambda)}
    head_decay, head_no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in adapter_ids:
            (head_decay if p.dim() >= 2 else head_no_decay).append(p)
    groups = [
        {"name": "adapter", "params": pq, "lr": lr, "weight_decay": weight_decay},
        {"name": "adapter_lambda", "params": lam, "lr": lr, "weight_decay": lambda_weight_decay},
        {"name": "head", "params": head_decay, "lr": head_lr, "weight_decay": weight_decay},
        {"name": "head_no_decay", "params": head_no_decay, "lr": head_lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    *,
    lr: float,
    head_lr: float | None = None,
    weight_decay: float = 0.0,
    lambda_weight_decay: float = 0.0,
    **optimizer_args: Any,
) -> torch.optim.Optimizer:
    """Build an optimizer over :func:`param_groups`.

    Args:
        model: the model with adapters.
        name: ``"adamw"`` (default), ``"adam"``, ``"sgd"`` (momentum 0.9 unless given) or the
            dotted import path of an optimizer class.
        lr, head_lr, weight_decay, lambda_weight_decay: see :func:`param_groups`.
        **optimizer_args: further keyword arguments of the optimizer (``betas``, ``eps``, ...).

    Raises:
        ValueError: unknown optimizer, non-positive learning rate, negative weight decay, an
            argument that the groups set (``params``, ``lr``, ``weight_decay``), or a model
            without trainable parameters.
    """
    if name in _BUILTIN:
        path, defaults = _BUILTIN[name]
        optimizer_args = {**defaults, **optimizer_args}
    elif isinstance(name, str) and "." in name:
        path = name
    else:
        raise ValueError(
            f"optimizer={name!r} is not supported; expected one of {list(OPTIMIZERS)} or the "
            "import path of an optimizer class (e.g. torch.optim.RAdam)"
        )
    cls = import_component(path, "optimizer")
    for field, value in (("lr", lr), ("head_lr", lr if head_lr is None else head_lr)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{field}={value!r} must be a positive finite number")
    for field, value in (
        ("weight_decay", weight_decay),
        ("lambda_weight_decay", lambda_weight_decay),
    ):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{field}={value!r} must be a finite number >= 0")
    clash = sorted(set(optimizer_args) & set(_GROUP_ARGS))
    if clash:
        raise ValueError(
            f"optimizer arguments {clash}: set by the parameter groups; give lr / head_lr / "
            "weight_decay as the module's own arguments"
        )
    groups = param_groups(
        model,
        lr=lr,
        head_lr=head_lr,
        weight_decay=weight_decay,
        lambda_weight_decay=lambda_weight_decay,
    )
    if not groups:
        raise ValueError(
            "the model has no trainable parameters: add adapters (adarank.add_adapters) first"
        )
    kwargs = {"lr": lr} if _accepts(cls, "lr") else {}
    optimizer = cls(groups, **kwargs, **optimizer_args)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer={name!r} built a {type(optimizer).__name__}, not an Optimizer")
    return optimizer


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, component: str, total_steps: int, **scheduler_args: Any
) -> torch.optim.lr_scheduler.LRScheduler:
    """``component(optimizer, **scheduler_args)``, stepped once per optimizer step.

    Arguments named in :data:`SCHEDULER_STEP_ARGS` that the scheduler accepts and
    ``scheduler_args`` does not set receive ``total_steps``.

    Raises:
        ValueError: the component cannot be imported, or builds a ``ReduceLROnPlateau`` (which
            needs a monitored metric, not a step count) or something that is not a scheduler.
    """
    fn = import_component(component, "lr_scheduler")
    params = inspect.signature(fn).parameters
    for name in SCHEDULER_STEP_ARGS:
        if name in params and name not in scheduler_args:
            scheduler_args[name] = int(total_steps)
    scheduler = fn(optimizer, **scheduler_args)
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) or not hasattr(
        scheduler, "step"
    ):
        raise ValueError(
            f"lr_scheduler={component!r} built a {type(scheduler).__name__}; expected a "
            "scheduler stepped once per optimizer step (ReduceLROnPlateau is not supported)"
        )
    return scheduler


def linear_warmup_decay(step: int, total_steps: int, warmup_ratio: float) -> float:
    """LR multiplier at optimizer step ``step``: linear ramp to 1, then linear decay to 0.

    ``warmup = ceil(warmup_ratio · total_steps)``; ``f(s) = (s + 1) / (warmup + 1)`` for
    ``s < warmup`` (never exactly 0 on the first step), else ``(T − s) / (T − warmup)``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio={warmup_ratio} must be in [0, 1)")
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
