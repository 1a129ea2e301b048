"""Value checks of :func:`adarank.config.validate.validate_config` (numbers, patterns, steps).

Each function returns messages naming the key, the value and what was expected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "nonfinite_problems",
    "optimizer_problems",
    "quantization_config_problems",
    "target_module_problems",
    "trainer_value_problems",
]


def nonfinite_problems(node: Any, key: str = "") -> list[str]:
    """Every NaN / ±inf number in the config (no key accepts one)."""
    if isinstance(node, float) and not math.isfinite(node):
        return [f"{key}={node!r}: expected a finite number"]
    if isinstance(node, Mapping):
        return [p for k, v in node.items() for p in nonfinite_problems(v, f"{key}.{k}".strip("."))]
    if isinstance(node, (list, tuple)):
        return [p for i, v in enumerate(node) for p in nonfinite_problems(v, f"{key}[{i}]")]
    return []


def target_module_problems(patterns: Any) -> list[str]:
    """``re:`` patterns of ``adapter.target_modules`` / ``modules_to_save`` must compile."""
    items = [patterns] if isinstance(patterns, str) else patterns
    problems = []
    for item in items if isinstance(items, (list, tuple)) else []:
        if isinstance(item, str) and item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as err:
                problems.append(
                    f"adapter.target_modules: {item!r} is not a valid regular expression ({err})"
                )
    return problems


def trainer_value_problems(trainer: Any) -> list[str]:
    """Values that make the Trainer take no optimizer step at all."""
    if not isinstance(trainer, Mapping):
        return []
    problems = []
    steps, epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    if isinstance(steps, int) and not isinstance(steps, bool) and (steps == 0 or steps < -1):
        problems.append(
            f"trainer.max_steps={steps!r}: expected -1 (no step limit) or a positive number "
            "of optimizer steps"
        )
    if isinstance(epochs, int) and not isinstance(epochs, bool) and (epochs == 0 or epochs < -1):
        problems.append(f"trainer.max_epochs={epochs!r}: expected -1, null or a positive int")
    limit = trainer.get("limit_train_batches")
    if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit <= 0:
        problems.append(
            f"trainer.limit_train_batches={limit!r}: expected a positive count or fraction"
        )
    return problems


def optimizer_problems(opt: Mapping, optimizers: tuple[str, ...]) -> list[str]:
    """The ``optimizer`` section's values (a missing key: nothing to check; None: the default)."""
    from adarank.lightning.divergence import NONFINITE_POLICIES

    problems = []
    name = opt.get("name")
    if name is not None and name not in optimizers:
        problems.append(f"optimizer.name={name!r}: expected one of {list(optimizers)}")
    for key in ("lr", "head_lr"):
        lr = opt.get(key)
        if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr <= 0:
            problems.append(f"optimizer.{key}={lr!r}: expected a positive number")
    for key in ("weight_decay", "lambda_weight_decay"):
        wd = opt.get(key)
        if isinstance(wd, (int, float)) and not isinstance(wd, bool) and wd < 0:
            problems.append(f"optimizer.{key}={wd!r}: expected a number ≥ 0")
    wr = opt.get("warmup_ratio")
    if isinstance(wr, (int, float)) and not 0 <= wr < 1:
        problems.append(f"optimizer.warmup_ratio={wr!r}: expected a fraction in [0, 1)")
    policy = opt.get("nonfinite")
    if isinstance(policy, str) and policy not in NONFINITE_POLICIES:
        problems.append(
            f"optimizer.nonfinite={policy!r}: expected one of {list(NONFINITE_POLICIES)}"
        )
    skips = opt.get("max_skipped_steps")
    if isinstance(skips, int) and skips < 0:
        problems.append(f"optimizer.max_skipped_steps={skips!r}: expected an integer ≥ 0")
    return problems


def quantization_config_problems(cfg: Mapping) -> list[str]:
    """``model.quantization``: this machine, the model source, ``adapter.init`` and the trainer.

    A value that is not one of the allowed ones is left to the type check of the builder's
    signature; see :func:`adarank.models.quantization.quantization_problems`.
    """
    model = cfg.get("model")
    if not isinstance(model, Mapping) or model.get("quantization") is None:
        return []
    from adarank.models.quantization import QUANTIZATIONS, quantization_problems

    if model["quantization"] not in QUANTIZATIONS:
        return []
    adapter, trainer = cfg.get("adapter"), cfg.get("trainer")
    return quantization_problems(
        model["quantization"],
        name_or_path=model.get("name_or_path"),
        gguf_file=model.get("gguf_file"),
        init=adapter.get("init") if isinstance(adapter, Mapping) else None,
        accelerator=trainer.get("accelerator") if isinstance(trainer, Mapping) else None,
    )
