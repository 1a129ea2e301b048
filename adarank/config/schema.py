"""The top-level sections of a config; their keys, types and defaults are in
:mod:`adarank.config.structured` (one dataclass per section).

=============  =============================================================================
section        keys
=============  =============================================================================
description    one line shown by ``adarank recipes``
seed           global seed (``lightning.seed_everything``), an int
run            ``name`` (default: the recipe's file name), ``dir`` (default
               ``runs/<name>-<timestamp>``)
model          ``_component_`` + the builder's arguments (checked against its signature)
data           ``_component_`` + the datamodule's arguments (checked against its signature)
adapter        ``AdapterConfig`` (``add_adapters`` arguments, budget, init)
schedule       ``ScheduleConfig`` (budget schedule, passed to ``AdaRankModule``)
allocation     ``AllocationConfig`` (``enabled`` + rank-controller options)
optimizer      ``OptimizerConfig``, or ``_component_`` (any optimizer class) + its arguments
               (:mod:`adarank.config.components`)
lr_scheduler   null (linear warm-up and decay) or ``_component_`` + its arguments
trainer        any ``lightning.Trainer`` argument except ``logger``, ``callbacks``,
               ``default_root_dir`` (set from the logger / callbacks / run sections)
logger         ``LoggerConfig`` (``extra``: a list of ``_component_`` loggers)
callbacks      ``CallbacksConfig`` (``extra``: a list of ``_component_`` callbacks)
=============  =============================================================================
"""

from __future__ import annotations

import dataclasses

from adarank.config.structured import AdaRankConfig, section_args

__all__ = [
    "COMPONENT_SECTIONS",
    "INIT_STRATEGIES",
    "MODULE_ARGS",
    "SECTIONS",
    "TRAINER_RESERVED",
    "init_strategies",
]

#: ``adapter.init`` strategies (implemented in :mod:`adarank.init`; "lora" is the plain init)
INIT_STRATEGIES = ("lora", "svd", "covariance", "activations", "gradient")

SECTIONS = tuple(f.name for f in dataclasses.fields(AdaRankConfig))
COMPONENT_SECTIONS = ("model", "data")

#: config key → ``AdaRankModule`` argument, per section (from the structured schema)
MODULE_ARGS: dict[str, dict[str, str]] = {
    s: section_args(s) for s in ("schedule", "allocation", "optimizer")
}

TRAINER_RESERVED = {
    "logger": "use the logger section (logger.csv, logger.wandb)",
    "callbacks": "use the callbacks section",
    "default_root_dir": "use run.dir",
}


def init_strategies() -> tuple[str, ...]:
    """Strategy names published by :mod:`adarank.init`, else :data:`INIT_STRATEGIES`."""
    try:
        import adarank.init as init
    except ImportError:
        return INIT_STRATEGIES
    names = getattr(init, "STRATEGY_NAMES", None) or getattr(init, "STRATEGIES", None)
    return tuple(names) if names else INIT_STRATEGIES
