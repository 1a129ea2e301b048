"""Typed structured configs: the one source of the keys, types and defaults of a config.

One dataclass per section (``run``, ``adapter``, ``schedule``, ``allocation``, ``optimizer``,
``logger``, ``callbacks``); :class:`AdaRankConfig` is the whole config. A field's annotation is
its type, its default the section's default, ``metadata["arg"]`` the argument of
``add_adapters`` (``adapter``) or ``AdaRankModule`` (``schedule`` / ``allocation`` /
``optimizer``) it feeds (None: a config-only key), and ``metadata["type"]``, where given, the
exact type where the annotation must stay ``Any`` for OmegaConf (unions with lists or dicts).

Defaults that the library API also has are read from the library's constants, never restated:
``add_adapters`` ← :data:`~adarank.modules.inject.ADAPTER_DEFAULTS`, the budget schedule ←
:data:`~adarank.allocation.budget.SCHEDULE_DEFAULTS`, ``RankController`` ←
:data:`~adarank.allocation.controller.CONTROLLER_DEFAULTS`, the optimizer options of
``AdaRankModule`` ← :data:`~adarank.lightning.module.OPTIMIZER_DEFAULTS`.

Who reads them: :func:`adarank.config.load_config` fills missing keys with the defaults
(:func:`fill_defaults`; so ``config.yaml`` of a run and ``--print-config`` show every key),
:func:`adarank.config.validate_config` checks keys and types against the fields and merges the
config onto ``OmegaConf.structured(AdaRankConfig)`` (:func:`structured_problems`), and the
builders read the merged, typed config (:func:`typed`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from adarank.allocation.budget import SCHEDULE_DEFAULTS as SD
from adarank.allocation.controller import CONTROLLER_DEFAULTS as CD
from adarank.config.errors import ConfigError
from adarank.lightning.module import OPTIMIZER_DEFAULTS as OD
from adarank.modules.inject import ADAPTER_DEFAULTS as AD
from adarank.modules.inject import ADAPTER_DTYPES

__all__ = [
    "AdaRankConfig",
    "AdapterConfig",
    "AllocationConfig",
    "CallbacksConfig",
    "LoggerConfig",
    "OptimizerConfig",
    "RunConfig",
    "ScheduleConfig",
    "SECTION_SCHEMAS",
    "fill_defaults",
    "section_args",
    "section_defaults",
    "section_types",
    "structured_problems",
    "typed",
]


def _key(default: Any, arg: str | None = None, type_: Any = None) -> Any:
    """A field with its default, the API argument it feeds and (optionally) its exact type."""
    return field(default=default, metadata={"arg": arg, "type": type_})


@dataclass
class RunConfig:
    name: str | None = None  # default: the recipe's file name
    dir: str | None = None  # default: runs/<name>-<timestamp>


@dataclass
class AdapterConfig:
    # module name patterns to adapt (plain names, globs, 're:' regexes, or "all-linear")
    target_modules: Any = _key(None, "target_modules", str | list[str] | None)
    # initial live rank per adapted module (int, or {module path: rank})
    init_rank: Any = _key(AD["init_rank"], "init_rank", int | dict)
    max_rank: int | None = _key(AD["max_rank"], "max_rank")  # None: min(d_in, d_out)
    scaling: float = _key(AD["scaling"], "scaling")  # constant factor on ΔW
    # "svd" (λ = 0, orthonormal P, Q; AdaLoRA) or "lora" (P = 0, λ = 1)
    factor_init: str = _key(AD["factor_init"], "factor_init")
    dropout: float = _key(AD["dropout"], "dropout")  # adapter input dropout
    # dtype of the adapter tensors (float32 also for a bf16 base; outputs in the base dtype)
    dtype: str | None = _key(
        AD["adapter_dtype"], "adapter_dtype", Literal[tuple(ADAPTER_DTYPES)] | None
    )
    # modules trained in full and saved with the adapter (e.g. the classifier head)
    modules_to_save: Any = _key(AD["modules_to_save"], "modules_to_save", str | list[str] | None)
    # final parameter budget: int, "150k" or "0.5%" of the base model (None: no allocation)
    budget: int | str | None = _key(None)
    init: str = _key("lora")  # initialization strategy (adarank.init), "lora": the plain init
    init_args: dict[str, Any] | None = _key(None)  # keyword arguments of the init strategy


@dataclass
class ScheduleConfig:
    init_budget_ratio: float = _key(SD["init_budget_ratio"], "init_budget_ratio")  # b_0 / b_T
    warmup_frac: float = _key(SD["warmup_frac"], "warmup_frac")  # steps before allocating
    final_frac: float = _key(SD["final_frac"], "final_frac")  # steps with the pattern frozen
    warmup_steps: int | None = _key(None, "warmup_steps")  # t_w in steps (over warmup_frac)
    final_steps: int | None = _key(None, "final_steps")  # t_f in steps (over final_frac)
    interval: int = _key(SD["interval"], "interval")  # ΔT, optimizer steps between allocations
    decay: str = _key(SD["decay"], "decay")  # cubic | linear | constant
    total_steps: int | None = _key(None, "total_steps")  # T (None: the Trainer's total steps)


@dataclass
class AllocationConfig:
    enabled: bool = _key(True)  # false: fixed ranks (plain LoRA with SVD-style factors)
    min_rank: int = _key(CD["min_rank"], "min_rank")
    max_rank: int | None = _key(CD["max_rank"], "max_rank")  # None: adapter.max_rank
    scorer: str = _key(CD["scorer"], "scorer")  # energy | sensitivity | magnitude
    grow: bool = _key(CD["grow"], "grow")  # grow new triplets (else prune only)
    orth_reg: float = _key(CD["orth_reg"], "orth_reg")  # γ of the orthogonality regulariser
    retract: bool = _key(CD["retract"], "retract")  # exact re-orthonormalisation of P, Q each step
    # growth candidates scored above the batch's gradient-noise floor (docs/theory.md)
    denoise_growth: bool = _key(CD["denoise_growth"], "denoise_growth")


@dataclass
class OptimizerConfig:
    # adamw | adam | sgd; None: AdaRankModule's default (adamw) or the _component_ given
    name: str | None = _key(None, "optimizer")
    lr: float = _key(OD["lr"], "lr")  # adapter learning rate
    head_lr: float | None = _key(OD["head_lr"], "head_lr")  # modules_to_save (None: lr)
    weight_decay: float = _key(OD["weight_decay"], "weight_decay")
    # decoupled decay of λ alone: each singular value of ΔW stays below ≈ scaling / it
    lambda_weight_decay: float = _key(OD["lambda_weight_decay"], "lambda_weight_decay")
    warmup_ratio: float = _key(OD["warmup_ratio"], "warmup_ratio")  # linear LR warm-up, decay
    nonfinite: str = _key(OD["nonfinite"], "nonfinite")  # fail | skip a non-finite step
    max_skipped_steps: int = _key(OD["max_skipped_steps"], "max_skipped_steps")


@dataclass
class LoggerConfig:
    csv: bool = True  # CSVLogger under <run.dir>/logs
    wandb: bool = False  # W&B logger under <run.dir>/logs/wandb
    wandb_project: str = "adarank"
    wandb_mode: str | None = "offline"  # online | offline | disabled
    # more loggers: [{_component_: lightning.pytorch.loggers.TensorBoardLogger, ...}, ...];
    # save_dir defaults to <run.dir>/logs
    extra: list[Any] | None = None


@dataclass
class CallbacksConfig:
    snapshot_every_n_steps: int = 0  # adapter snapshots under <run.dir>/snapshots (0: end only)
    checkpoint_every_n_steps: int | None = None  # also refresh checkpoints/last.ckpt every n
    heatmap_every_n_events: int = 0  # re-render rank_heatmap.png every n allocation events
    # greedy-decoded evaluation (GenerationEvaluator arguments, e.g. {num_examples: 100}); on
    # whenever the datamodule offers generation_examples(), {num_examples: 0} turns it off
    generation: dict[str, Any] | None = None
    # more Lightning callbacks: [{_component_: lightning.pytorch.callbacks.EarlyStopping, ...}]
    extra: list[Any] | None = None


@dataclass
class AdaRankConfig:
    description: str | None = None  # one line shown by `adarank recipes`
    seed: int = 0  # global seed (lightning.seed_everything)
    run: RunConfig = field(default_factory=RunConfig)
    model: Any = None  # _component_ + the builder's arguments (checked against its signature)
    data: Any = None  # _component_ + the datamodule's arguments
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    # adarank's keys, plus _component_ and its arguments (any optimizer class)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: Any = None  # None: linear warm-up and decay; or _component_ + arguments
    trainer: Any = None  # lightning.Trainer arguments (checked against its signature)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)


#: section → its dataclass (the sections whose keys adarank itself defines)
SECTION_SCHEMAS: dict[str, type] = {
    "run": RunConfig,
    "adapter": AdapterConfig,
    "schedule": ScheduleConfig,
    "allocation": AllocationConfig,
    "optimizer": OptimizerConfig,
    "logger": LoggerConfig,
    "callbacks": CallbacksConfig,
}
#: sections filled with their defaults by :func:`fill_defaults` (``run`` has its own rules)
_FILLED = ("adapter", "schedule", "allocation", "optimizer", "logger", "callbacks")


def section_types(section: str) -> dict[str, Any]:
    """``{key: type}`` of a section (``metadata["type"]`` over the annotation)."""
    cls = SECTION_SCHEMAS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: f.metadata.get("type") or hints[f.name] for f in dataclasses.fields(cls)}


def section_defaults(section: str) -> dict[str, Any]:
    """``{key: default}`` of a section."""
    return {f.name: f.default for f in dataclasses.fields(SECTION_SCHEMAS[section])}


def section_args(section: str) -> dict[str, str]:
    """``{config key: API argument}`` of a section (config-only keys left out)."""
    fields = dataclasses.fields(SECTION_SCHEMAS[section])
    return {f.name: f.metadata["arg"] for f in fields if f.metadata.get("arg")}


def fill_defaults(cfg: MutableMapping) -> None:
    """Add the default of every key a section of ``cfg`` leaves out (in place; never raises).

    Args:
        cfg: a ``DictConfig`` or a plain dict. A section that is not a mapping (null counts as
            absent) is left for the validator.
    """
    if "seed" not in cfg:
        cfg["seed"] = AdaRankConfig.seed
    for section in _FILLED:
        node = cfg.get(section) if section in cfg else None
        if node is None:
            cfg[section] = section_defaults(section)
        elif isinstance(node, MutableMapping):
            for key, value in section_defaults(section).items():
                if key not in node:
                    node[key] = value


def _plain(cfg: DictConfig | Mapping) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _schema() -> DictConfig:
    schema = OmegaConf.structured(AdaRankConfig)
    OmegaConf.set_struct(schema.optimizer, False)  # an optimizer _component_'s own arguments
    return schema


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


#: what OmegaConf raises for a value that does not fit the schema
_MERGE_ERRORS = (OmegaConfBaseException, TypeError, ValueError)


def _message(err: Exception, plain: Mapping, section: str = "") -> str:
    """OmegaConf's error as ``key=value: problem; expected ...``."""
    key = str(getattr(err, "full_key", None) or "")
    if not key and section:
        return f"{section}={plain.get(section)!r}: {str(err).splitlines()[0]}"
    section, _, name = key.partition(".")
    node = plain.get(section)
    value = node.get(name) if name and isinstance(node, Mapping) else node
    if isinstance(err, ConfigKeyError):
        if section in SECTION_SCHEMAS and name:
            known = sorted(section_types(section))
        else:
            known = [f.name for f in dataclasses.fields(AdaRankConfig)]
        return f"{key}={value!r}: unknown key; expected one of {known}"
    if section in SECTION_SCHEMAS and name in section_types(section):
        expected = _type_name(section_types(section)[name])
        return f"{key}={value!r}: wrong type {type(value).__name__}; expected {expected}"
    return f"{key or 'config'}: {str(err).splitlines()[0]}"


def structured_problems(cfg: DictConfig | Mapping) -> list[str]:
    """Merge each section of ``cfg`` onto ``OmegaConf.structured(AdaRankConfig)``.

    Returns:
        one message per section OmegaConf rejects (unknown key, value not of the field's type),
        naming the key, the value and the expected type.
    """
    plain, problems = _plain(cfg), []
    for section, node in plain.items():
        try:
            OmegaConf.merge(_schema(), {section: node})
        except _MERGE_ERRORS as err:
            found = _key_problems(section, node, plain) if isinstance(node, Mapping) else []
            problems += found or [_message(err, plain, section)]
    return problems


def _key_problems(section: str, node: Mapping, plain: Mapping) -> list[str]:
    """The keys of one section that OmegaConf rejects, merged one at a time."""
    problems = []
    for key, value in node.items():
        try:
            OmegaConf.merge(_schema(), {section: {key: value}})
        except _MERGE_ERRORS as err:
            if getattr(err, "full_key", None) or section not in SECTION_SCHEMAS:
                problems.append(_message(err, plain, section))
            else:
                expected = _type_name(section_types(section).get(key, Any))
                problems.append(
                    f"{section}.{key}={value!r}: wrong type {type(value).__name__}; "
                    f"expected {expected}"
                )
    return problems


def typed(cfg: DictConfig | Mapping) -> dict:
    """``cfg`` merged onto the schema: every key present, values converted to their types.

    Raises:
        ConfigError: what :func:`structured_problems` reports.
    """
    plain = _plain(cfg)
    try:
        merged = OmegaConf.merge(_schema(), plain)
    except _MERGE_ERRORS as err:
        raise ConfigError(_message(err, plain)) from err
    return OmegaConf.to_container(merged, resolve=True)
