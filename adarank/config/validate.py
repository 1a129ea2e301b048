"""Check a composed config without building anything (no model, no data loading).

Checks: unknown sections and keys and value types (against the dataclasses of
:mod:`adarank.config.structured`, then OmegaConf's own checks when the config is merged onto
``OmegaConf.structured(AdaRankConfig)``; for ``model``, ``data`` and ``trainer``, against the
signatures of the builders and of ``lightning.Trainer``), the budget string, the init strategy, the budget schedule (a ``BudgetSchedule`` is
constructed when the number of steps is known — it is a pure dataclass), and data files and
their columns (the header only is read). Every problem is collected, then one
:class:`ConfigError` lists them all; each message names the key, the value and what was
expected.
"""

from __future__ import annotations

import copy
import inspect
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from adarank.config.components import component_problems, optimizer_component
from adarank.config.errors import ConfigError
from adarank.config.instantiate import (
    COMPONENT_KEY,
    check_arguments,
    check_type,
    get_component,
    signature_params,
)
from adarank.config.schema import (
    COMPONENT_SECTIONS,
    MODULE_ARGS,
    SECTIONS,
    TRAINER_RESERVED,
    init_strategies,
)
from adarank.config.structured import fill_defaults, section_types, structured_problems
from adarank.config.validate_values import (
    nonfinite_problems,
    optimizer_problems,
    quantization_config_problems,
    target_module_problems,
    trainer_value_problems,
)

__all__ = ["schedule_for", "validate_config"]


def _name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _check_keys(section: str, node: Any, schema: Mapping[str, Any]) -> list[str]:
    if node is None:
        return []
    if not isinstance(node, Mapping):
        return [f"{section}={node!r}: expected a mapping with keys {sorted(schema)}"]
    problems = []
    for key, value in node.items():
        if key not in schema:
            problems.append(
                f"{section}.{key}={value!r}: unknown key; expected one of {sorted(schema)}"
            )
        elif not isinstance(schema[key], str) and not check_type(value, schema[key]):
            problems.append(
                f"{section}.{key}={value!r}: wrong type {type(value).__name__}; "
                f"expected {_name(schema[key])}"
            )
    return problems


def _trainer_problems(node: Any) -> list[str]:
    import lightning

    params = signature_params(lightning.Trainer)
    try:
        hints = typing.get_type_hints(lightning.Trainer.__init__)
    except Exception:
        hints = {}
    schema = {n: hints.get(n, p.annotation) for n, p in params.items() if n not in TRAINER_RESERVED}
    problems = []
    if isinstance(node, Mapping):
        for key in list(node):
            if key in TRAINER_RESERVED:
                problems.append(
                    f"trainer.{key}={node[key]!r}: not settable here; {TRAINER_RESERVED[key]}"
                )
        node = {k: v for k, v in node.items() if k not in TRAINER_RESERVED}
        problems += [
            p.replace("unknown key", "unknown lightning.Trainer argument")
            for p in _check_keys("trainer", node, schema)
        ]
    else:
        problems += _check_keys("trainer", node, schema)
    return problems


def _budget_problems(adapter: Mapping) -> tuple[list[str], int | None]:
    budget = adapter.get("budget")
    if budget is None:
        return [], None
    from adarank.allocation import resolve_budget

    try:
        # percentages need the base model size; use a large stand-in to check the syntax only
        value = resolve_budget(budget, 10**12, field="adapter.budget")
    except (TypeError, ValueError) as err:
        return [str(err)], None
    is_pct = isinstance(budget, str) and budget.strip().endswith("%")
    return [], None if is_pct else value


def schedule_for(final_budget: int, total_steps: int, schedule: Mapping):
    """The ``BudgetSchedule`` that ``AdaRankModule`` will build from the ``schedule`` section.

    Both call :meth:`BudgetSchedule.from_fractions` (one set of defaults and roundings), so
    impossible schedules are reported before anything is built.

    Raises:
        ValueError / TypeError: from ``BudgetSchedule`` validation.
    """
    from adarank.allocation import BudgetSchedule

    args = {MODULE_ARGS["schedule"][k]: v for k, v in schedule.items()}
    total = int(args.pop("total_steps", None) or total_steps)
    return BudgetSchedule.from_fractions(final_budget, total, **args)


def _schedule_problems(cfg: Mapping, final_budget: int | None) -> list[str]:
    alloc = cfg.get("allocation") or {}
    if isinstance(alloc, Mapping) and alloc.get("enabled") is False:
        return []
    adapter = cfg.get("adapter") or {}
    if isinstance(adapter, Mapping) and adapter.get("budget") is None:
        return [
            "adapter.budget=None: adaptive allocation needs a budget; set adapter.budget "
            "(e.g. 150000 or '0.5%') or allocation.enabled=false"
        ]
    trainer = cfg.get("trainer") or {}
    steps = trainer.get("max_steps", -1) if isinstance(trainer, Mapping) else -1
    schedule = cfg.get("schedule") or {}
    if isinstance(schedule, Mapping) and schedule.get("total_steps"):
        steps = schedule["total_steps"]
    if not isinstance(steps, int) or steps <= 0 or not isinstance(schedule, Mapping):
        return []  # the number of steps is known only once the data is loaded: checked in fit
    try:
        schedule_for(final_budget or 1000, steps, schedule)
    except (TypeError, ValueError) as err:
        return [
            f"schedule with {steps} total steps (trainer.max_steps / schedule.total_steps): {err}"
        ]
    return []


def _data_file_problems(data: Mapping) -> list[str]:
    problems = []
    try:
        params = signature_params(get_component(data[COMPONENT_KEY], "data._component_"))
    except (ConfigError, KeyError):
        return []

    def arg(name: str) -> Any:
        if name in data:
            return data[name]
        p = params.get(name)
        return None if p is None or p.default is inspect.Parameter.empty else p.default

    from adarank.data.files import check_table, table_format

    for key in ("train_file", "val_file"):
        path = data.get(key)
        if path is None:
            continue
        if not isinstance(path, str):
            continue  # reported as a type problem
        if Path(path).expanduser().is_dir():
            problems.append(f"data.{key}={path!r}: is a directory; expected a file")
            continue
        if not Path(path).expanduser().is_file():
            problems.append(f"data.{key}={path!r}: file not found; expected an existing file")
            continue
        columns = [arg(c) for c in ("text_column", "label_column") if c in params]
        if not columns:
            continue
        try:
            table_format(path)
            check_table(path, [c for c in columns if isinstance(c, str)])
        except (ValueError, FileNotFoundError) as err:
            problems.append(f"data.{key}={path!r}: {err}")
    return problems


def _model_problems(model: Mapping) -> list[str]:
    name = model.get("name_or_path")
    if (
        isinstance(name, str)
        and name.startswith((".", "/", "~"))
        and not Path(name).expanduser().is_dir()
    ):
        return [
            f"model.name_or_path={name!r}: directory not found; expected a local model dir, "
            "a hub id, or minilm / tiny-bert / tiny-gpt2"
        ]
    return []


def _generation_problems(callbacks: Any) -> list[str]:
    """``callbacks.generation`` keys checked against ``GenerationEvaluator``'s signature."""
    gen = callbacks.get("generation") if isinstance(callbacks, Mapping) else None
    if not isinstance(gen, Mapping):
        return []
    if "run_dir" in gen:
        return [f"callbacks.generation.run_dir={gen['run_dir']!r}: set by the run (use run.dir)"]
    node = {COMPONENT_KEY: "adarank.lightning.generation.GenerationEvaluator", **gen}
    return check_arguments(node, "callbacks.generation")


def validate_config(cfg: DictConfig | Mapping) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg`` (nothing is built).

    Args:
        cfg: a composed config (see :func:`adarank.config.load_config`).
    """
    if isinstance(cfg, DictConfig):
        plain = OmegaConf.to_container(cfg, resolve=True)
    else:
        plain = copy.deepcopy(dict(cfg))
    fill_defaults(plain)  # the value checks below see every key
    problems: list[str] = []
    for key, value in plain.items():
        if key not in SECTIONS:
            problems.append(
                f"{key}={value!r}: unknown top-level section; expected one of {list(SECTIONS)}"
            )
    if "description" in plain and not isinstance(plain["description"], str):
        problems.append(f"description={plain['description']!r}: expected a string")
    seed = plain.get("seed")
    if not check_type(seed, int):
        problems.append(f"seed={seed!r}: wrong type {type(seed).__name__}; expected int")
    problems += _check_keys("run", plain.get("run"), section_types("run"))
    for section in COMPONENT_SECTIONS:
        node = plain.get(section)
        if not isinstance(node, Mapping):
            problems.append(
                f"{section}={node!r}: missing or not a mapping; expected {COMPONENT_KEY} and the builder's arguments"
            )
            continue
        problems += check_arguments(node, section)
    if isinstance(plain.get("model"), Mapping):
        problems += _model_problems(plain["model"])
    problems += quantization_config_problems(plain)
    if isinstance(plain.get("data"), Mapping) and COMPONENT_KEY in plain["data"]:
        problems += _data_file_problems(plain["data"])
    adapter = plain.get("adapter") or {}
    problems += _check_keys("adapter", adapter, section_types("adapter"))
    final_budget = None
    if isinstance(adapter, Mapping):
        if adapter.get("target_modules") in (None, [], ""):
            problems.append(
                f"adapter.target_modules={adapter.get('target_modules')!r}: expected at least one module name pattern"
            )
        problems += target_module_problems(adapter.get("target_modules"))
        scaling = adapter.get("scaling")
        if isinstance(scaling, (int, float)) and scaling == 0:
            problems.append("adapter.scaling=0: ΔW would stay zero; expected a non-zero number")
        init = adapter.get("init")
        if isinstance(init, str) and init not in init_strategies():
            problems.append(
                f"adapter.init={init!r}: unknown strategy; expected one of {list(init_strategies())}"
            )
        factor_init = adapter.get("factor_init")
        if factor_init not in ("svd", "lora"):
            problems.append(
                f"adapter.factor_init={factor_init!r}: expected 'svd' (λ = 0, orthonormal P, Q) "
                "or 'lora' (P = 0, λ = 1)"
            )
        rank = adapter.get("init_rank")
        if isinstance(rank, int) and not isinstance(rank, bool) and rank < 0:
            problems.append(f"adapter.init_rank={rank!r}: expected an integer ≥ 0")
        for key in ("dropout",):
            v = adapter.get(key)
            if isinstance(v, (int, float)) and not 0 <= v < 1:
                problems.append(f"adapter.{key}={v!r}: expected a number in [0, 1)")
        budget_problems, final_budget = _budget_problems(adapter)
        problems += budget_problems
    from adarank.lightning.optim import OPTIMIZERS

    for section in ("schedule", "allocation", "optimizer"):
        node = plain.get(section)
        if section == "optimizer" and optimizer_component(node)[0] is not None:
            node = {k: v for k, v in node.items() if k in MODULE_ARGS["optimizer"]}
        problems += _check_keys(section, node, section_types(section))
    opt = plain.get("optimizer") or {}
    if isinstance(opt, Mapping):
        problems += optimizer_problems(opt, OPTIMIZERS)
    problems += component_problems(plain)
    problems += _trainer_problems(plain.get("trainer") or {})
    problems += trainer_value_problems(plain.get("trainer"))
    seen = {p.split("=", 1)[0] for p in problems}
    problems += [p for p in nonfinite_problems(plain) if p.split("=", 1)[0] not in seen]
    from adarank.lightning.wandb_utils import WANDB_MODES

    problems += _check_keys("logger", plain.get("logger"), section_types("logger"))
    log = plain.get("logger") or {}
    if isinstance(log, Mapping) and log.get("wandb_mode") not in (None, *WANDB_MODES):
        problems.append(
            f"logger.wandb_mode={log.get('wandb_mode')!r}: expected one of {list(WANDB_MODES)} or null"
        )
    problems += _check_keys("callbacks", plain.get("callbacks"), section_types("callbacks"))
    problems += _generation_problems(plain.get("callbacks"))
    seen = {p.split("=", 1)[0] for p in problems}
    problems += [p for p in structured_problems(plain) if p.split("=", 1)[0] not in seen]
    if not problems:
        problems += _schedule_problems(plain, final_budget)
    if problems:
        raise ConfigError(problems)
