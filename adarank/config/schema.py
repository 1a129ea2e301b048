"""The top-level sections of a config and the keys each accepts.

=============  =============================================================================
section        keys
=============  =============================================================================
description    one line shown by ``adarank recipes``
seed           global seed (``lightning.seed_everything``), an int
run            ``name`` (default: the recipe's file name), ``dir`` (default
               ``runs/<name>-<timestamp>``)
model          ``_component_`` + the builder's arguments (checked against its signature)
data           ``_component_`` + the datamodule's arguments (checked against its signature)
adapter        :data:`ADAPTER_KEYS`
schedule       budget-schedule options (:data:`MODULE_ARGS`, passed to ``AdaRankModule``)
allocation     ``enabled`` + rank-controller options (:data:`MODULE_ARGS`)
optimizer      optimizer and learning-rate options (:data:`MODULE_ARGS`), or ``_component_``
               (any optimizer class) + its arguments (:mod:`adarank.config.components`)
lr_scheduler   null (linear warm-up and decay) or ``_component_`` + its arguments
trainer        any ``lightning.Trainer`` argument except ``logger``, ``callbacks``,
               ``default_root_dir`` (set from the logger / callbacks / run sections)
logger         :data:`LOGGER_KEYS` (``extra``: a list of ``_component_`` loggers)
callbacks      :data:`CALLBACK_KEYS` (``extra``: a list of ``_component_`` callbacks)
=============  =============================================================================
"""

from __future__ import annotations

from typing import Any, Literal

from adarank.modules.inject import ADAPTER_DTYPES

__all__ = [
    "ADAPTER_KEYS",
    "CALLBACK_KEYS",
    "COMPONENT_SECTIONS",
    "INIT_STRATEGIES",
    "LOGGER_KEYS",
    "MODULE_ARGS",
    "RUN_KEYS",
    "SECTIONS",
    "TRAINER_RESERVED",
    "init_strategies",
    "module_section_keys",
]

#: ``adapter.init`` strategies (implemented in :mod:`adarank.init`; "lora" is the plain init)
INIT_STRATEGIES = ("lora", "svd", "covariance", "activations", "gradient")

SECTIONS = (
    "description",
    "seed",
    "run",
    "model",
    "data",
    "adapter",
    "schedule",
    "allocation",
    "optimizer",
    "lr_scheduler",
    "trainer",
    "logger",
    "callbacks",
)
COMPONENT_SECTIONS = ("model", "data")

RUN_KEYS: dict[str, Any] = {"name": str, "dir": str}

#: key → annotation for the ``adapter`` section
ADAPTER_KEYS: dict[str, Any] = {
    # module name patterns to adapt (plain names, globs, 're:' regexes)
    "target_modules": str | list[str],
    # initial live rank per adapted module (int, or {module path: rank})
    "init_rank": int | dict,
    # per-layer rank capacity (None: min(d_in, d_out)); also the allocator's max_rank
    "max_rank": int | None,
    # constant factor on ΔW
    "scaling": float,
    # factor init: "svd" (λ = 0, orthonormal P, Q; AdaLoRA) or "lora" (P = 0, λ = 1)
    "factor_init": str,
    # adapter input dropout
    "dropout": float,
    # dtype of the adapter tensors (float32 also for a bf16 base; outputs are in the base dtype)
    "dtype": Literal[tuple(ADAPTER_DTYPES)] | None,
    # modules trained in full and saved with the adapter (e.g. the classifier head)
    "modules_to_save": str | list[str] | None,
    # final parameter budget: int, "150k", or "0.5%" of the base model (None: no allocation)
    "budget": int | str | None,
    # initialization strategy, one of INIT_STRATEGIES
    "init": str,
    # keyword arguments of the init strategy (e.g. calibration batches)
    "init_args": dict | None,
}

#: config key → ``AdaRankModule`` argument, per section (types come from its signature)
MODULE_ARGS: dict[str, dict[str, str]] = {
    "schedule": {
        "init_budget_ratio": "init_budget_ratio",  # b_0 / b_T (AdaLoRA ≈ 1.5)
        "warmup_frac": "warmup_frac",  # fraction of steps before the first allocation
        "final_frac": "final_frac",  # fraction of final steps with the rank pattern frozen
        "warmup_steps": "warmup_steps",  # t_w in steps (overrides warmup_frac)
        "final_steps": "final_steps",  # t_f in steps (overrides final_frac)
        "interval": "interval",  # ΔT, optimizer steps between allocations
        "decay": "decay",  # cubic | linear | constant
        "total_steps": "total_steps",  # schedule length T (default: the Trainer's total steps)
    },
    "allocation": {
        "min_rank": "min_rank",
        "max_rank": "max_rank",
        "scorer": "scorer",  # energy | sensitivity | magnitude
        "grow": "grow",  # grow new triplets (else prune only)
        "orth_reg": "orth_reg",  # γ of the orthogonality regulariser
    },
    "optimizer": {
        "name": "optimizer",  # adamw | adam | sgd (or _component_: any optimizer class)
        "lr": "lr",  # adapter learning rate
        "head_lr": "head_lr",  # modules_to_save learning rate (default lr)
        "weight_decay": "weight_decay",
        "warmup_ratio": "warmup_ratio",  # linear LR warm-up fraction, then linear decay
        "nonfinite": "nonfinite",  # fail | skip: a step with non-finite loss/gradients/update
        "max_skipped_steps": "max_skipped_steps",  # most steps nonfinite=skip may drop
    },
}

LOGGER_KEYS: dict[str, Any] = {
    "csv": bool,  # CSVLogger under <run.dir>/logs
    "wandb": bool,  # W&B logger under <run.dir>/logs/wandb
    "wandb_project": str,
    "wandb_mode": str | None,  # online | offline | disabled | None (offline unless a key is set)
    # more loggers: [{_component_: lightning.pytorch.loggers.TensorBoardLogger, ...}, ...];
    # save_dir defaults to <run.dir>/logs
    "extra": list | None,
}

CALLBACK_KEYS: dict[str, Any] = {
    "snapshot_every_n_steps": int,  # adapter snapshots under <run.dir>/snapshots (0: end only)
    "checkpoint_every_n_steps": int | None,  # also refresh checkpoints/last.ckpt every n steps
    "heatmap_every_n_events": int,  # re-render rank_heatmap.png every n allocation events
    # greedy-decoded evaluation for instruction data (GenerationEvaluator arguments, e.g.
    # {num_examples: 100, max_new_tokens: 16}); on whenever the datamodule offers
    # generation_examples(), {num_examples: 0} turns it off
    "generation": dict | None,
    # more Lightning callbacks: [{_component_: lightning.pytorch.callbacks.EarlyStopping,
    # monitor: val/loss, patience: 3}, ...]
    "extra": list | None,
}

TRAINER_RESERVED = {
    "logger": "use the logger section (logger.csv, logger.wandb)",
    "callbacks": "use the callbacks section",
    "default_root_dir": "use run.dir",
}


def module_section_keys(section: str) -> dict[str, Any]:
    """Keys of ``schedule``/``allocation``/``optimizer``, typed from ``AdaRankModule``."""
    import typing

    from adarank.config.instantiate import signature_params
    from adarank.lightning import AdaRankModule

    params = signature_params(AdaRankModule)
    try:
        hints = typing.get_type_hints(AdaRankModule.__init__)
    except Exception:
        hints = {}
    out: dict[str, Any] = {"enabled": bool} if section == "allocation" else {}
    for key, arg in MODULE_ARGS[section].items():
        if arg in params:
            out[key] = hints.get(arg, params[arg].annotation)
    return out


def init_strategies() -> tuple[str, ...]:
    """Strategy names published by :mod:`adarank.init`, else :data:`INIT_STRATEGIES`."""
    try:
        import adarank.init as init
    except ImportError:
        return INIT_STRATEGIES
    names = getattr(init, "STRATEGY_NAMES", None) or getattr(init, "STRATEGIES", None)
    return tuple(names) if names else INIT_STRATEGIES
