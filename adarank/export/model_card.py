"""The ``README.md`` model card written next to a PEFT export (Hugging Face Hub format).

YAML front matter (``library_name: peft``, ``base_model`` when it is a Hub id, ``tags``,
``pipeline_tag`` from the task type), then the budget, the final ranks by module type
(layers, min / mean / max rank, parameters), the rank-trajectory figure when the run has one, and
how to load the adapter with PEFT.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from adarank.analysis.naming import TYPE_ORDER, module_type
from adarank.models.hf import BUILTIN_HUB_IDS, TINY_MODELS, resolve_name_or_path
from adarank.modules import adapter_layers

__all__ = ["CARD_NAME", "base_model_id", "is_hub_id", "model_card", "rank_table"]

CARD_NAME = "README.md"
#: PEFT task type → Hub pipeline tag
PIPELINE_TAGS = {"CAUSAL_LM": "text-generation", "SEQ_CLS": "text-classification"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def base_model_id(name_or_path: str | None) -> str | None:
    """The Hub id of a built-in, by name or by its installed directory; anything else unchanged.

    ``"smollm2"`` → ``"HuggingFaceTB/SmolLM2-135M-Instruct"``; the directory ``"minilm"`` loads
    from (a model's ``config._name_or_path``) → ``"sentence-transformers/all-MiniLM-L6-v2"``.
    """
    if not name_or_path:
        return None
    if name_or_path in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        for name, hub_id in BUILTIN_HUB_IDS.items():
            try:
                if Path(resolve_name_or_path(name)).resolve() == path.resolve():
                    return hub_id
            except (ValueError, OSError):  # that built-in is not installed
                continue
    return name_or_path


def is_hub_id(name: str | None) -> bool:
    """True for names shaped like a Hub id that are neither local paths nor code-built models."""
    if not name or name in TINY_MODELS or not _HUB_ID.match(name):
        return False
    return not Path(name).expanduser().exists()


def _group(name: str) -> str:
    kind, leaf = module_type(name), name.rsplit(".", 1)[-1]
    return kind if leaf == kind else f"{kind} ({leaf})"


def rank_table(model: nn.Module) -> list[dict]:
    """Final ranks by module type: ``{"type", "layers", "min", "mean", "max", "params"}`` rows."""
    groups: dict[str, list] = {}
    for name, layer in adapter_layers(model).items():
        groups.setdefault(_group(name), []).append(layer)

    def order(label: str) -> tuple[int, str]:
        kind = label.split(" (")[0]
        return (TYPE_ORDER.index(kind) if kind in TYPE_ORDER else len(TYPE_ORDER), label)

    rows = []
    for label in sorted(groups, key=order):
        ranks = [layer.rank for layer in groups[label]]
        rows.append(
            {
                "type": label,
                "layers": len(ranks),
                "min": min(ranks),
                "mean": sum(ranks) / len(ranks),
                "max": max(ranks),
                "params": sum(layer.live_params for layer in groups[label]),
            }
        )
    return rows


def _front_matter(base_model: str | None, task_type: str | None) -> list[str]:
    lines = ["---", "library_name: peft"]
    tags = ["adarank", "lora", "peft"]
    if is_hub_id(base_model):
        lines.append(f"base_model: {base_model}")
        tags.append(f"base_model:adapter:{base_model}")
    if task_type in PIPELINE_TAGS:
        lines.append(f"pipeline_tag: {PIPELINE_TAGS[task_type]}")
    lines += ["tags:", *(f"- {t}" for t in tags), "---", ""]
    return lines


def _usage(model: nn.Module, base_model: str | None) -> list[str]:
    cls = type(model)
    source = base_model if is_hub_id(base_model) else "<the base model>"
    if cls.__module__.startswith("transformers"):
        load = f"from transformers import {cls.__name__}\n\n"
        load += f'base = {cls.__name__}.from_pretrained("{source}")'
    else:
        load = f"base = ...  # the {cls.__name__} this adapter was trained on"
    return [
        "## Usage",
        "",
        "```python",
        "from peft import PeftModel",
        load,
        'model = PeftModel.from_pretrained(base, "<this repository or directory>")',
        "```",
        "",
    ]


def model_card(
    model: nn.Module,
    *,
    base_model: str | None,
    param_budget: int | None = None,
    task_type: str | None = None,
    rank_figure: str | None = None,
    notes: Sequence[str] = (),
) -> str:
    """Markdown model card for the PEFT export of ``model``'s adarank adapter.

    Args:
        model: the model with adapters (its live ranks are the final ranks).
        base_model: the base model's Hub id or path (``base_model`` metadata only for Hub ids).
        param_budget: the run's parameter budget (None: not stated).
        task_type: PEFT task type (sets ``pipeline_tag``).
        rank_figure: file name of the rank-trajectory image next to the card.
        notes: extra sentences (e.g. how the base weights were obtained).
    """
    layers = adapter_layers(model)
    live = sum(layer.live_params for layer in layers.values())
    zero = sum(1 for layer in layers.values() if layer.rank == 0)
    shifted = sum(1 for layer in layers.values() if layer.shift_P.shape[1])
    title = f"adarank LoRA adapter for {base_model}" if base_model else "adarank LoRA adapter"
    lines = _front_matter(base_model, task_type) + [f"# {title}", ""]
    lines += [
        "A LoRA adapter whose per-layer ranks were allocated during training under a global "
        "parameter budget (adarank: SVD-form adapters W0 + s·P·diag(λ)·Q, triplets pruned and "
        "grown by importance), exported in PEFT's LoRA format (per-layer ranks in `r` and `rank_pattern`).",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base_model or 'unknown'}` |",
    ]
    if param_budget is not None:
        lines.append(f"| parameter budget | {param_budget:,} |")
    lines += [
        f"| adapter parameters | {live:,} |",
        f"| adapted layers | {len(layers)}"
        + (f" ({zero} pruned to rank 0, left out of the export) |" if zero else " |"),
    ]
    if task_type:
        lines.append(f"| PEFT task type | {task_type} |")
    lines += ["", "## Final ranks", "", "| module type | layers | min | mean | max | parameters |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for row in rank_table(model):
        lines.append(
            f"| {row['type']} | {row['layers']} | {row['min']} | {row['mean']:.1f} | "
            f"{row['max']} | {row['params']:,} |"
        )
    lines.append("")
    if shifted:
        lines += [
            f"{shifted} layers also carry the low-rank base shift of a data-aware init, so their "
            "PEFT rank is the rank above plus the shift's rank.",
            "",
        ]
    if rank_figure:
        lines += ["## Rank trajectory", "", f"![Rank of every adapted layer]({rank_figure})", ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines + _usage(model, base_model))
