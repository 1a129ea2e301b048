"""Pluggable ``_component_`` nodes beyond model and data: optimizer, LR schedule, loggers, callbacks.

=======================  ====================================================================
config                   called as
=======================  ====================================================================
``optimizer``            ``cls(param_groups, lr=optimizer.lr, **args)`` — the groups of
                         :mod:`adarank.lightning.optim` (adapter / λ without weight decay /
                         head); ``lr``, ``head_lr``, ``weight_decay``, ``warmup_ratio``,
                         ``nonfinite``, ``max_skipped_steps`` stay adarank's own keys
``lr_scheduler``         ``fn(optimizer, **args)``, stepped every optimizer step; its
                         ``total_steps`` / ``num_training_steps`` / ``T_max`` gets the run's steps
``logger.extra[i]``      ``cls(**args)``, ``save_dir`` = ``<run.dir>/logs`` unless given
``callbacks.extra[i]``   ``cls(**args)``, added after adarank's own callbacks
=======================  ====================================================================

Every node is checked against its builder's signature without building it
(:func:`adarank.config.instantiate.check_arguments`); :func:`component_problems` lists the
problems for :func:`adarank.config.validate.validate_config`.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Mapping
from typing import Any

from adarank.config.errors import ConfigError
from adarank.config.instantiate import (
    COMPONENT_KEY,
    check_arguments,
    get_component,
    signature_params,
)
from adarank.config.schema import MODULE_ARGS

__all__ = [
    "LOGGER_PACKAGES",
    "component_problems",
    "extra_nodes",
    "optimizer_component",
    "scheduler_component",
]

#: logger class name → packages of which one must be importable (checked before the run)
LOGGER_PACKAGES: dict[str, tuple[str, ...]] = {
    "TensorBoardLogger": ("tensorboard", "tensorboardX"),
    "MLFlowLogger": ("mlflow",),
    "WandbLogger": ("wandb",),
    "CometLogger": ("comet_ml",),
    "NeptuneLogger": ("neptune",),
}


def optimizer_component(node: Any) -> tuple[str | None, dict[str, Any]]:
    """``(import path, extra optimizer arguments)`` of an ``optimizer`` section.

    The path is None when the section has no ``_component_`` (the built-in ``name`` is used);
    the arguments are the keys that are not adarank's own (:data:`MODULE_ARGS`).
    """
    if not isinstance(node, Mapping) or node.get(COMPONENT_KEY) is None:
        return None, {}
    own = set(MODULE_ARGS["optimizer"])
    args = {k: v for k, v in node.items() if k != COMPONENT_KEY and k not in own}
    return node[COMPONENT_KEY], args


def scheduler_component(node: Any) -> tuple[str | None, dict[str, Any]]:
    """``(import path, arguments)`` of an ``lr_scheduler`` section (None, {} when absent)."""
    if not isinstance(node, Mapping) or node.get(COMPONENT_KEY) is None:
        return None, {}
    return node[COMPONENT_KEY], {k: v for k, v in node.items() if k != COMPONENT_KEY}


def extra_nodes(node: Any) -> list[Mapping]:
    """The ``extra`` list of a ``logger`` or ``callbacks`` section ([] when absent)."""
    extra = node.get("extra") if isinstance(node, Mapping) else None
    return list(extra or [])


def _first_param(fn: Any) -> set[str]:
    """The first parameter (the param groups / the optimizer, passed positionally)."""
    names = list(signature_params(fn))
    return {names[0]} if names else set()


def _class_problem(fn: Any, path: str, key: str, base: type, what: str) -> list[str]:
    if inspect.isclass(fn) and not issubclass(fn, base):
        return [f"{key}={path!r}: not a {what} (a {base.__module__}.{base.__name__} subclass)"]
    return []


def _node_problems(
    node: Mapping, section: str, base: type, what: str, injected: set[str]
) -> list[str]:
    """Signature and class checks of one ``_component_`` node."""
    problems = check_arguments(node, section, injected=frozenset(injected))
    try:
        fn = get_component(node[COMPONENT_KEY], f"{section}.{COMPONENT_KEY}")
    except (ConfigError, KeyError):
        return problems  # reported by check_arguments
    key = f"{section}.{COMPONENT_KEY}"
    return problems + _class_problem(fn, node[COMPONENT_KEY], key, base, what)


def _optimizer_problems(node: Any) -> list[str]:
    import torch

    path, args = optimizer_component(node)
    if path is None:
        return []
    problems = []
    if node.get("name") is not None:
        problems.append(
            f"optimizer.name={node['name']!r} and optimizer._component_={path!r}: give one "
            "(name for a built-in optimizer, _component_ for any optimizer class)"
        )
    for key in sorted(set(args) & {"params", "param_groups"}):
        problems.append(f"optimizer.{key}={args[key]!r}: set by adarank (the parameter groups)")
    args = {k: v for k, v in args.items() if k not in ("params", "param_groups")}
    try:
        fn = get_component(path, f"optimizer.{COMPONENT_KEY}")
    except ConfigError as err:
        return problems + err.problems
    injected = _first_param(fn) | {"lr", "weight_decay"}
    problems += _node_problems(
        {COMPONENT_KEY: path, **args}, "optimizer", torch.optim.Optimizer, "optimizer", injected
    )
    return problems


def _scheduler_problems(node: Any) -> list[str]:
    import torch

    from adarank.lightning.optim import SCHEDULER_STEP_ARGS

    if node is None:
        return []
    if not isinstance(node, Mapping) or node.get(COMPONENT_KEY) is None:
        return [
            f"lr_scheduler={node!r}: expected null (linear warm-up and decay, "
            "optimizer.warmup_ratio) or a mapping with _component_ and its arguments"
        ]
    path = node[COMPONENT_KEY]
    try:
        fn = get_component(path, f"lr_scheduler.{COMPONENT_KEY}")
    except ConfigError as err:
        return err.problems
    injected = _first_param(fn) | set(SCHEDULER_STEP_ARGS)
    lr_sched = torch.optim.lr_scheduler
    problems = _node_problems(
        dict(node), "lr_scheduler", lr_sched.LRScheduler, "scheduler", injected
    )
    if inspect.isclass(fn) and issubclass(fn, lr_sched.ReduceLROnPlateau):
        problems.append(
            f"lr_scheduler._component_={path!r}: needs a monitored metric, not a step count; "
            "expected a scheduler stepped every optimizer step"
        )
    return problems


def _extra_problems(section: str, node: Any) -> list[str]:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import Logger

    extra = node.get("extra") if isinstance(node, Mapping) else None
    if extra is None:
        return []
    if not isinstance(extra, list):
        return [f"{section}.extra={extra!r}: expected a list of {{_component_: ..., ...}}"]
    base, what = (Logger, "logger") if section == "logger" else (Callback, "Lightning callback")
    injected = {"save_dir"} if section == "logger" else set()
    problems = []
    for i, item in enumerate(extra):
        key = f"{section}.extra[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{key}={item!r}: expected a mapping with _component_ and arguments")
            continue
        problems += _node_problems(item, key, base, what, injected)
        packages = LOGGER_PACKAGES.get(str(item.get(COMPONENT_KEY, "")).rpartition(".")[2])
        if section == "logger" and packages and not any(_installed(p) for p in packages):
            problems.append(
                f"{key}._component_={item[COMPONENT_KEY]!r}: needs the {packages[0]!r} package, "
                f"which is not installed (pip install {packages[0]})"
            )
    return problems


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def component_problems(plain: Mapping) -> list[str]:
    """Problems of the ``optimizer`` / ``lr_scheduler`` components and the extra loggers and
    callbacks of a plain (resolved) config."""
    return (
        _optimizer_problems(plain.get("optimizer"))
        + _scheduler_problems(plain.get("lr_scheduler"))
        + _extra_problems("logger", plain.get("logger"))
        + _extra_problems("callbacks", plain.get("callbacks"))
    )
