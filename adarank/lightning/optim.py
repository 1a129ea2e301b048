"""Optimizer and learning-rate schedule for adapter training.

Parameter groups (named, so the allocation engine and users can find them):

* ``"adapter"`` — ``lora_P`` and ``lora_Q`` of every :class:`~adarank.modules.SVDLoRALinear`
  (learning rate ``lr``, weight decay ``weight_decay``);
* ``"adapter_lambda"`` — the singular values ``lora_lambda`` (``lr``, no weight decay: decay on
  λ would shrink the adapted singular values towards the pruning threshold);
* ``"head"`` — every other trainable parameter, i.e. the ``modules_to_save`` (``head_lr``;
  weight decay on matrices only, not on biases/norms).

The schedule is linear warm-up over ``warmup_ratio · total_steps`` optimizer steps, then linear
decay to 0 — a pure function of the optimizer step, stepped once per optimizer step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adarank.modules import adapter_layers

__all__ = ["OPTIMIZERS", "build_optimizer", "linear_warmup_decay", "param_groups"]

OPTIMIZERS = ("adamw", "adam", "sgd")


def param_groups(
    model: nn.Module, *, lr: float, head_lr: float | None = None, weight_decay: float = 0.0
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
        {"name": "adapter_lambda", "params": lam, "lr": lr, "weight_decay": 0.0},
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
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """Build ``"adamw"`` (default), ``"adam"`` or ``"sgd"`` over :func:`param_groups`.

    Raises:
        ValueError: unknown optimizer, non-positive learning rate, negative weight decay, or a
            model without trainable parameters.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not supported; expected one of {list(OPTIMIZERS)}")
    for field, value in (("lr", lr), ("head_lr", lr if head_lr is None else head_lr)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{field}={value!r} must be a positive finite number")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} must be >= 0")
    groups = param_groups(model, lr=lr, head_lr=head_lr, weight_decay=weight_decay)
    if not groups:
        raise ValueError(
            "the model has no trainable parameters: add adapters (adarank.add_adapters) first"
        )
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":  # L2 penalty (coupled), as torch.optim.Adam defines weight_decay
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


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
