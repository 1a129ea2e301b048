"""Find target layers by name, swap in :class:`SVDLoRALinear`, freeze everything else.

Patterns (PEFT-like ``target_modules``, with globs and regexes):
    * ``"re:<regex>"`` — a regular expression that must match the whole qualified name;
    * a pattern with ``* ? [`` — a shell glob (``fnmatch``) on the whole qualified name,
      e.g. ``"*query"``, ``"*.mlp.*"``;
    * a plain name — matches the name itself or any name ending in ``".<name>"``,
      e.g. ``"c_attn"`` matches ``transformer.h.0.attn.c_attn``.

A glob or regex selects the linear layers among the modules it matches (``"*.mlp.*"`` adapts
GPT-2's ``c_fc`` and ``c_proj`` and skips ``act`` and ``dropout``); it is an error when it matches
only non-linear modules. A plain name that matches a non-linear module is an error.

``target_modules="all-linear"`` (:data:`ALL_LINEAR`, like PEFT's preset) adapts every
``nn.Linear`` / ``Conv1D`` except the output head — the module returned by
``model.get_output_embeddings()`` (when the model has that method) and any module named
``lm_head`` — and except the modules inside ``modules_to_save`` (e.g. a classification head).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from adarank.modules.svd_lora import SVDLoRALinear, is_conv1d, is_quantized, linear_shape

__all__ = [
    "ADAPTER_DEFAULTS",
    "ADAPTER_DTYPES",
    "ALL_LINEAR",
    "add_adapters",
    "all_linear_names",
    "adapter_layers",
    "match_name",
    "merge_adapters",
    "unmerge_adapters",
    "mark_trainable",
    "count_parameters",
    "saved_modules",
    "resize_to",
]


#: the ``target_modules`` value that selects every linear layer except the output head
ALL_LINEAR = "all-linear"
#: ``adapter.dtype`` names → dtypes of the adapter tensors (float32 also for bf16/fp16 bases)
ADAPTER_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: the one definition of :func:`add_adapters`' defaults, read by the config schema
#: (``adarank.config.structured``); ``scaling`` 16 gives LoRA-like learning speed at learning
#: rates 1e-3–6e-3 (λ moves about ``lr`` per Adam step, ΔW ``scaling`` times that)
ADAPTER_DEFAULTS = {
    "init_rank": 8,
    "scaling": 16.0,
    "max_rank": None,
    "dropout": 0.0,
    "modules_to_save": None,
    "adapter_dtype": "float32",
    "factor_init": "svd",
}


def match_name(name: str, pattern: str) -> bool:
    """Whether qualified module ``name`` matches one ``target_modules`` pattern."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def _as_patterns(patterns: str | Iterable[str] | None, field: str) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    out = list(patterns)
    if not all(isinstance(p, str) for p in out):
        raise TypeError(f"{field} must be a string or a list of strings, got {patterns!r}")
    return out


def _is_wildcard(pattern: str) -> bool:
    return pattern.startswith("re:") or any(ch in pattern for ch in "*?[")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head: ``get_output_embeddings()`` and modules called ``lm_head``."""
    heads = {n for n, _ in model.named_modules() if n == "lm_head" or n.endswith(".lm_head")}
    get_head = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get_head):
        try:
            head = get_head()
        except (NotImplementedError, AttributeError):
            head = None
    if isinstance(head, nn.Module):
        heads |= {n for n, m in model.named_modules() if m is head}
    return heads


def all_linear_names(
    model: nn.Module, modules_to_save: str | Sequence[str] | None = None
) -> list[str]:
    """The layers ``target_modules="all-linear"`` adapts, in module order.

    Every ``nn.Linear`` / transformers ``Conv1D`` except the output head (see
    :func:`_output_head_names`) and anything inside a module matching ``modules_to_save``.
    """
    save = _as_patterns(modules_to_save, "modules_to_save")
    skip = _output_head_names(model)
    skip |= {n for n, _ in model.named_modules() if n and any(match_name(n, p) for p in save)}
    return [
        name
        for name, module in model.named_modules()
        if name
        and _is_linear(module)
        and not any(name == s or name.startswith(s + ".") for s in skip)
    ]


def _adapter_dtype(adapter_dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(adapter_dtype, str):
        if adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(
                f"adapter dtype {adapter_dtype!r}: expected one of {list(ADAPTER_DTYPES)}"
            )
        return ADAPTER_DTYPES[adapter_dtype]
    if adapter_dtype not in ADAPTER_DTYPES.values():
        raise ValueError(
            f"adapter dtype {adapter_dtype}: expected one of {list(ADAPTER_DTYPES.values())}"
        )
    return adapter_dtype


def adapter_layers(model: nn.Module) -> dict[str, SVDLoRALinear]:
    """All adapter layers of ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLoRALinear)}


def _match_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the linear modules matching ``patterns`` (errors as in :func:`add_adapters`)."""
    if not patterns:
        raise ValueError("target_modules is empty: give at least one name, glob or 're:' regex")
    matched: list[str] = []
    linear_names: list[str] = []
    non_linear: dict[str, list[str]] = {p: [] for p in patterns}  # wildcard hits to report
    for name, module in model.named_modules():
        if not name:
            continue
        if _is_linear(module):
            linear_names.append(name)
        hits = [p for p in patterns if match_name(name, p)]
        if not hits:
            continue
        if _is_linear(module):
            matched.append(name)
            continue
        for p in hits:
            if not _is_wildcard(p):  # a plain name must point at a linear layer
                raise TypeError(
                    f"target module {name!r} matched {p!r} but is a {type(module).__name__}; "
                    "only torch.nn.Linear and transformers Conv1D can be adapted "
                    "(use a more specific pattern)"
                )
            non_linear[p].append(f"{name} ({type(module).__name__})")
    for p in patterns:  # a glob/regex selects the linear layers among its matches
        if non_linear[p] and not any(match_name(n, p) for n in matched):
            shown = ", ".join(non_linear[p][:10]) + (" ..." if len(non_linear[p]) > 10 else "")
            raise TypeError(
                f"target pattern {p!r} matched only modules that are not linear: [{shown}]; "
                "only torch.nn.Linear and transformers Conv1D can be adapted"
            )
    if not matched:
        shown = ", ".join(linear_names[:40]) + (" ..." if len(linear_names) > 40 else "")
        raise ValueError(
            f"target_modules {patterns} matched no module; candidate linear layers: [{shown}]"
        )
    return matched


def add_adapters(
    model: nn.Module,
    target_modules: str | Sequence[str],
    init_rank: int | dict[str, int] = ADAPTER_DEFAULTS["init_rank"],
    *,
    scaling: float = ADAPTER_DEFAULTS["scaling"],
    max_rank: int | None = ADAPTER_DEFAULTS["max_rank"],
    dropout: float = ADAPTER_DEFAULTS["dropout"],
    modules_to_save: str | Sequence[str] | None = ADAPTER_DEFAULTS["modules_to_save"],
    adapter_dtype: torch.dtype | str = ADAPTER_DEFAULTS["adapter_dtype"],
    seed: int | None = None,
    factor_init: str = ADAPTER_DEFAULTS["factor_init"],
) -> dict[str, SVDLoRALinear]:
    """Wrap every linear module matching ``target_modules`` with an :class:`SVDLoRALinear`.

    All other parameters are frozen except those of modules matching ``modules_to_save``
    (e.g. a classification head), which stay trainable.

    Args:
        model: any ``nn.Module`` (transformers models included); modified in place.
        target_modules: patterns (see module docstring) selecting layers to adapt, or
            ``"all-linear"`` (every linear layer but the output head and ``modules_to_save``).
        init_rank: initial live rank, one int for all or ``{qualified name: rank}``.
        scaling: constant factor on ΔW (see :class:`SVDLoRALinear`); default 16, the shipped
            transformer presets' value (LoRA-like learning speed at lr 1e-3–6e-3 under Adam;
            ``1.0`` is AdaLoRA's parametrisation and needs lr ≈ 1e-2).
        max_rank: per-layer capacity; default ``min(d_in, d_out)``.
        dropout: adapter input dropout.
        modules_to_save: patterns of modules to keep trainable and save with the adapter.
        adapter_dtype: dtype of the adapter tensors, a ``torch.dtype`` or a name of
            :data:`ADAPTER_DTYPES` (``"float32"``, ``"bfloat16"``); independent of the base dtype
            (a bf16 base keeps float32 adapters by default; outputs are in the base dtype).
            Defaults: :data:`ADAPTER_DEFAULTS`.
        seed: seed for the orthonormal init (deterministic if given).
        factor_init: ``"svd"`` (λ = 0, orthonormal P, Q) or ``"lora"`` (P = 0, λ = 1); see
            :class:`SVDLoRALinear`.

    Returns:
        ``{qualified_name: layer}`` of the new adapter layers.

    Raises:
        ValueError: nothing matched (the candidate linear layer names are listed), or a bad rank.
        TypeError: a matched module is not linear.
    """
    adapter_dtype = _adapter_dtype(adapter_dtype)
    save_patterns = _as_patterns(modules_to_save, "modules_to_save")
    if adapter_layers(model):
        raise ValueError("model already has adapters; remove them or load into a fresh model")
    patterns = _as_patterns(target_modules, "target_modules")
    if ALL_LINEAR in patterns:
        if len(patterns) > 1:
            raise ValueError(
                f"target_modules={patterns}: {ALL_LINEAR!r} selects every linear layer but the "
                "output head and cannot be combined with other patterns"
            )
        matched = all_linear_names(model, save_patterns)
        if not matched:
            raise ValueError(f"target_modules={ALL_LINEAR!r}: the model has no linear layer")
    else:
        matched = _match_targets(model, patterns)
    if isinstance(init_rank, dict):
        unknown = sorted(set(init_rank) - set(matched))
        if unknown:
            raise ValueError(f"init_rank names {unknown} are not among the matched layers")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, SVDLoRALinear] = {}
    for name in matched:
        base = model.get_submodule(name)
        rank = init_rank.get(name, 0) if isinstance(init_rank, dict) else int(init_rank)
        cap = None if max_rank is None else min(max_rank, min(linear_shape(base)))
        layer = SVDLoRALinear(
            base,
            min(rank, cap) if cap is not None else rank,
            scaling=scaling,
            max_rank=cap,
            dropout=dropout,
            adapter_dtype=adapter_dtype,
            generator=generator,
            factor_init=factor_init,
        )
        _set_submodule(model, name, layer)
        layers[name] = layer
    mark_trainable(model, save_patterns)
    model._adarank_modules_to_save = save_patterns  # recorded for save_adapter
    return layers


def mark_trainable(model: nn.Module, modules_to_save: Sequence[str] = ()) -> list[str]:
    """Make adapter parameters and ``modules_to_save`` trainable; return the saved module names."""
    saved = []
    for name, module in model.named_modules():
        if name and any(match_name(name, p) for p in modules_to_save):
            if isinstance(module, SVDLoRALinear):
                raise ValueError(f"{name!r} is both an adapter target and in modules_to_save")
            inner = [n for n, m in module.named_modules() if isinstance(m, SVDLoRALinear)]
            if inner:
                raise ValueError(
                    f"modules_to_save entry {name!r} contains adapter layer(s) "
                    f"{[f'{name}.{n}' for n in inner[:5]]}; save a smaller module"
                )
            if any(name.startswith(s + ".") for s in saved):
                continue
            for p in module.parameters():
                p.requires_grad_(True)
            saved.append(name)
    if modules_to_save and not saved:
        raise ValueError(f"modules_to_save {list(modules_to_save)} matched no module")
    for layer in adapter_layers(model).values():
        for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q):
            p.requires_grad_(True)
    return saved


def saved_modules(model: nn.Module) -> list[str]:
    """Names of the modules kept trainable by ``modules_to_save`` (outermost matches)."""
    patterns = getattr(model, "_adarank_modules_to_save", [])
    out: list[str] = []
    for name, _ in model.named_modules():
        if name and any(match_name(name, p) for p in patterns):
            if not any(name.startswith(s + ".") for s in out):
                out.append(name)
    return out


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter's ΔW into its base weight (idempotent)."""
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo :func:`merge_adapters` (idempotent)."""
    for layer in adapter_layers(model).values():
        layer.unmerge()


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"adapter": live adapter params, "saved": modules_to_save params, "base": frozen base}``.

    A quantized linear layer (:func:`~adarank.modules.svd_lora.is_quantized`, e.g. a
    bitsandbytes ``Linear4bit`` whose weight packs two 4-bit values per byte) counts its
    unquantized ``d_out · d_in`` weight parameters, so percentage budgets mean the same with and
    without quantization.
    """
    logical = {
        id(m.weight): m.out_features * m.in_features
        for m in model.modules()
        if isinstance(m, nn.Linear) and is_quantized(m)
    }
    layers = adapter_layers(model)
    adapter = sum(layer.live_params for layer in layers.values())
    adapter_ids = {
        id(p) for layer in layers.values() for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q)
    }
    saved = sum(
        p.numel() for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids
    )
    base = sum(
        logical.get(id(p), p.numel()) for p in model.parameters() if id(p) not in adapter_ids
    )
    base -= saved
    return {"adapter": adapter, "saved": saved, "base": base}


def resize_to(model: nn.Module, ranks: dict[str, int]) -> None:
    """Resize adapter layers to ``{name: rank}`` (before loading a state dict saved at those ranks).

    Raises:
        ValueError: a name is not an adapter layer of ``model``.
    """
    layers = adapter_layers(model)
    unknown = sorted(set(ranks) - set(layers))
    if unknown:
        raise ValueError(
            f"ranks given for layers that are not adapters of this model: {unknown[:5]}"
        )
    for name, rank in ranks.items():
        layer = layers[name]
        if rank > layer.max_rank:
            layer.max_rank = min(int(rank), min(layer.d_in, layer.d_out))
        layer.set_rank(int(rank))
