"""Turn a validated config into objects: datamodule, model with adapters, AdaRankModule.

Order and injection (the only places where built objects feed each other)::

    data   = instantiate(cfg.data); data.setup("fit")          bad data raises here
    model  = instantiate(cfg.model, num_labels=data.num_labels, data=data)
    add_adapters(model, **cfg.adapter)  → adarank.init.initialize_adapters(cfg.adapter.init)
    module = AdaRankModule(model, data.task_type, budget=cfg.adapter.budget, **schedule,
                           **allocation, **optimizer, lr_scheduler=...)

Keys, defaults and the API argument each key feeds come from the dataclasses of
:mod:`adarank.config.structured` (the config is merged onto them first: :func:`typed`).

:func:`check_feasible` then verifies what needs the built model (budget vs adapter capacity,
the schedule at the real number of steps) before any run directory is written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from adarank.config.components import optimizer_component, scheduler_component
from adarank.config.errors import ConfigError
from adarank.config.instantiate import instantiate
from adarank.config.schema import MODULE_ARGS
from adarank.config.structured import section_args, typed

__all__ = [
    "add_config_adapters",
    "build_data",
    "build_model",
    "build_module",
    "check_feasible",
    "estimate_total_steps",
    "module_kwargs",
]

_HEAD_TASK = {"sequence_classification": "classification", "causal_lm": "causal_lm"}


def _plain(cfg: DictConfig | Mapping) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def build_data(cfg: DictConfig | Mapping, *, setup: bool = True):
    """Instantiate ``cfg.data`` and (by default) run its ``setup`` — bad data raises here."""
    data = instantiate(_plain(cfg)["data"], "data")
    if setup:
        data.setup("fit")
    return data


def build_model(
    cfg: DictConfig | Mapping, data=None, *, num_labels: int | None = None
) -> nn.Module:
    """Instantiate ``cfg.model``, injecting ``num_labels`` and ``data`` where accepted.

    Raises:
        ConfigError: the model head does not match the data's task.
    """
    plain = _plain(cfg)
    node = plain["model"]
    task_type = getattr(data, "task_type", None)
    head = _HEAD_TASK.get(node.get("task")) if "task" in node else None
    if head is not None and task_type is not None and head != task_type:
        raise ConfigError(
            f"model.task={node['task']!r} builds a {head} head but data "
            f"({type(data).__name__}) provides {task_type} batches"
        )
    injected: dict[str, Any] = {}
    if num_labels is None and data is not None and hasattr(data, "label_names"):
        num_labels = data.num_labels
    if num_labels is not None:
        injected["num_labels"] = num_labels
    if data is not None:
        injected["data"] = data
    return instantiate(node, "model", **injected)


def add_config_adapters(cfg: DictConfig | Mapping, model: nn.Module, data=None) -> dict:
    """Add adapters per ``cfg.adapter`` and run ``adapter.init`` (returns the init report).

    ``adapter.init`` other than ``"lora"`` calls ``adarank.init.initialize_adapters`` with the
    training batches and ``adapter.init_args``.
    """
    from adarank.modules import add_adapters

    plain = typed(cfg)
    ad = plain["adapter"]
    # null values (dtype, max_rank, modules_to_save) take add_adapters' own defaults
    given = {arg: ad[key] for key, arg in section_args("adapter").items() if ad[key] is not None}
    add_adapters(model, seed=plain["seed"], **given)
    strategy = ad["init"]
    init_args = dict(ad["init_args"] or {})
    if strategy == "lora" and not init_args:
        return {}
    try:
        from adarank.init import initialize_adapters
    except ImportError as err:
        raise ConfigError(
            f"adapter.init={strategy!r} needs adarank.init.initialize_adapters ({err})"
        ) from err
    task = getattr(data, "task_type", None)
    batches = data.train_dataloader() if data is not None else None
    forward_fn = None
    if task is not None:
        from adarank.lightning.tasks import run_task

        def forward_fn(m, batch):
            return run_task(task, m, batch)

    init_args.setdefault("seed", plain["seed"])
    report = initialize_adapters(model, strategy, batches, forward_fn=forward_fn, **init_args)
    return report.to_dict() if hasattr(report, "to_dict") else {}


def module_kwargs(cfg: DictConfig | Mapping) -> dict[str, Any]:
    """``AdaRankModule`` keyword arguments from the adapter/schedule/allocation/optimizer keys.

    An ``optimizer._component_`` becomes ``optimizer`` (its import path) and
    ``optimizer_args`` (its other arguments); ``lr_scheduler`` becomes ``lr_scheduler`` and
    ``lr_scheduler_args``.
    """
    plain = typed(cfg)
    kwargs: dict[str, Any] = {
        "budget": plain["adapter"]["budget"] if plain["allocation"]["enabled"] else None
    }
    opt_path, opt_args = optimizer_component(plain["optimizer"])
    for section, mapping in MODULE_ARGS.items():
        for key, arg in mapping.items():
            if not (key == "name" and plain[section][key] is None):
                kwargs[arg] = plain[section][key]
    if opt_path is not None:
        kwargs.update(optimizer=opt_path, optimizer_args=opt_args)
    sched_path, sched_args = scheduler_component(plain.get("lr_scheduler"))
    if sched_path is not None:
        kwargs.update(lr_scheduler=sched_path, lr_scheduler_args=sched_args)
    if kwargs["max_rank"] is None and plain["adapter"]["max_rank"] is not None:
        kwargs["max_rank"] = plain["adapter"]["max_rank"]
    return kwargs


def build_module(cfg: DictConfig | Mapping, model: nn.Module, data):
    """The ``AdaRankModule`` for ``model`` and ``data``'s task."""
    from adarank.lightning import AdaRankModule

    return AdaRankModule(model, data.task_type, **module_kwargs(cfg))


def estimate_total_steps(cfg: DictConfig | Mapping, data) -> int | None:
    """Optimizer steps the Trainer will take (None if unbounded or unknown)."""
    trainer = _plain(cfg).get("trainer") or {}
    max_steps = trainer.get("max_steps", -1)
    max_epochs = trainer.get("max_epochs")
    accumulate = int(trainer.get("accumulate_grad_batches", 1) or 1)
    try:
        batches = _batches_per_process(data.train_dataloader(), _data_parallel_processes(trainer))
    except (TypeError, AttributeError, RuntimeError):
        batches = None
    limit = trainer.get("limit_train_batches")
    if batches is not None and limit is not None:
        batches = int(limit) if isinstance(limit, int) else int(batches * float(limit))
    per_epoch = None if batches is None else max(1, math.ceil(batches / accumulate))
    by_epochs = None
    if per_epoch is not None and max_epochs is not None and max_epochs > 0:
        by_epochs = per_epoch * int(max_epochs)
    if isinstance(max_steps, int) and max_steps > 0:
        return max_steps if by_epochs is None else min(max_steps, by_epochs)
    if max_epochs is None and per_epoch is not None:
        return per_epoch * 1000  # Lightning's default max_epochs
    return by_epochs


def _data_parallel_processes(trainer: Mapping) -> int:
    """Processes that split each epoch under a data-parallel strategy (DDP, ``sharded_base``,
    FSDP, DeepSpeed): ``devices × num_nodes``; 1 otherwise or when ``devices`` is "auto"/-1."""
    strategy = str(trainer.get("strategy") or "auto").lower()
    if not any(key in strategy for key in ("ddp", "sharded", "fsdp", "deepspeed")):
        return 1
    devices = trainer.get("devices", "auto")
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, int) and devices > 0:
        count = devices
    elif isinstance(devices, str) and devices.strip().isdigit():
        count = int(devices)
    else:
        return 1
    return count * max(1, int(trainer.get("num_nodes", 1) or 1))


def _batches_per_process(loader, processes: int) -> int:
    """Batches one process sees per epoch: the sampler gives each of ``processes`` processes
    ⌈n / processes⌉ samples (padded, as ``DistributedSampler`` with ``drop_last=False``)."""
    if processes == 1:
        return len(loader)
    size, batch = getattr(loader, "dataset", None), getattr(loader, "batch_size", None)
    if size is None or not batch:
        return math.ceil(len(loader) / processes)
    per_process = math.ceil(len(size) / processes)
    return per_process // batch if loader.drop_last else math.ceil(per_process / batch)


def _bounds(module, layers: dict) -> tuple[int, int]:
    """(min, max) adapter params the controller's rank bounds allow (mirrors RankController)."""
    hp = module.hparams
    lo = hi = 0
    for name, layer in layers.items():
        cap = min(layer.d_in, layer.d_out)
        bound = hp.max_rank if hp.max_rank is not None else cap
        top = min(bound.get(name, cap) if isinstance(bound, Mapping) else bound, cap)
        low = hp.min_rank.get(name, 0) if isinstance(hp.min_rank, Mapping) else hp.min_rank
        if not 0 <= int(low) <= int(top):
            raise ConfigError(
                f"allocation.min_rank={low!r} for {name!r}: expected between 0 and its max_rank "
                f"{top} (allocation.max_rank / adapter.max_rank / min(d_in, d_out))"
            )
        lo += int(low) * layer.triplet_cost
        hi += int(top) * layer.triplet_cost
    return lo, hi


def check_feasible(cfg: DictConfig | Mapping, module, total_steps: int | None) -> None:
    """What needs the built model: trainable parameters, budget vs capacity, the schedule.

    Raises:
        ConfigError: no trainable parameter, no optimizer step, a budget below one triplet or
            above what the adapters can hold (final or initial), an impossible schedule.
    """
    from adarank.config.validate import schedule_for
    from adarank.modules import adapter_layers, count_parameters

    plain = _plain(cfg)
    ad = plain.get("adapter") or {}
    counts = count_parameters(module.model)
    if counts["adapter"] + counts["saved"] == 0:
        raise ConfigError(
            f"adapter.init_rank={ad.get('init_rank')!r} leaves 0 trainable parameters (every "
            "adapter at rank 0 and no modules_to_save): nothing to train; raise "
            "adapter.init_rank or add adapter.modules_to_save"
        )
    if total_steps is not None and total_steps < 1:
        raise ConfigError(
            f"the trainer would take {total_steps} optimizer steps (trainer.max_steps / "
            "max_epochs / limit_train_batches and the data size); expected at least 1"
        )
    if total_steps is None and module.hparams.total_steps is None:
        raise ConfigError(
            "the run has no end: trainer.max_steps and trainer.max_epochs are unbounded (-1) or "
            "the data has no length; set trainer.max_steps (or schedule.total_steps), which the "
            "budget and learning-rate schedules need"
        )
    fixed = module.hparams.total_steps
    if total_steps is not None and fixed is not None and total_steps > fixed:
        raise ConfigError(
            f"schedule.total_steps={fixed} but the trainer would take {total_steps} optimizer "
            f"steps: the learning rate is 0 after step {fixed}; raise schedule.total_steps or "
            "lower trainer.max_steps"
        )
    budget = module.param_budget
    if budget is None:
        return
    layers = adapter_layers(module.model)
    raw = ad.get("budget")
    cheapest = min(layer.triplet_cost for layer in layers.values())
    if budget < cheapest:
        raise ConfigError(
            f"adapter.budget={raw!r} = {budget} params cannot hold one triplet: the cheapest "
            f"adapted module's triplet costs {cheapest} params (d_in + d_out + 1)"
        )
    lo, capacity = _bounds(module, layers)
    if budget > capacity:
        raise ConfigError(
            f"adapter.budget={raw!r} = {budget} params exceeds the {capacity} params that "
            f"{len(layers)} adapted modules can hold at their max_rank; lower the budget or "
            "raise adapter.max_rank / add target_modules"
        )
    if total_steps is None:
        return
    try:
        schedule = schedule_for(budget, total_steps, plain.get("schedule") or {})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"schedule with {total_steps} optimizer steps: {err}") from err
    try:
        schedule.check_bounds(lo, capacity)
    except ValueError as err:
        raise ConfigError(
            f"adapter.budget={raw!r} (warm-up budget {schedule.init_budget} = "
            f"schedule.init_budget_ratio × {budget}): {err}"
        ) from err
