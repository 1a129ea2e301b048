r"""Import a PEFT LoRA adapter into adarank's SVD form, to keep training it with adaptive ranks.

Each PEFT layer's update ``c · B A`` (``c = α/r``, or ``α/√r`` with rsLoRA) is re-factored exactly
as ``P diag(λ) Q`` with orthonormal P, Q and λ sorted (:func:`adarank.export.factors.refactor_lora`),
and an :class:`~adarank.modules.SVDLoRALinear` with that rank is put in place. The model then has
the same outputs as the PEFT model and can go straight into a ``RankController`` under a parameter
budget (AdaLoRA, Zhang et al. 2023, §3): its triplets are already ordered by magnitude.

Only plain LoRA is accepted: other PEFT methods (AdaLoRA, IA3, LoHa, …), DoRA, LoRA biases and
embedding LoRA have different maths and are refused with a clear error, as is an adapter trained on
another base (a missing module or a shape mismatch).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from adarank.export.factors import refactor_lora
from adarank.export.peft_export import PEFT_PREFIX, PEFT_WEIGHTS_NAME
from adarank.modules import SVDLoRALinear, add_adapters
from adarank.modules.svd_lora import linear_shape

__all__ = ["read_peft_config", "read_peft_lora", "import_peft_adapter"]

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_SAVED_WRAPPER = re.compile(r"\.modules_to_save\.[^.]+(?=\.)")


def read_peft_config(peft_dir: str | os.PathLike) -> dict:
    """Read ``adapter_config.json`` of a PEFT directory and check it is a plain LoRA adapter.

    Raises:
        FileNotFoundError: no such directory or no ``adapter_config.json``.
        ValueError: invalid JSON, another PEFT method, DoRA or LoRA biases.
    """
    path = Path(peft_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no adapter_config.json in {str(peft_dir)!r} (not a PEFT adapter?)"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"{path}: peft_type is {peft_type!r}; only plain LoRA adapters (peft_type 'LORA') can "
            "be imported (AdaLoRA, IA3, LoHa, ... have different maths)"
        )
    if config.get("use_dora"):
        raise ValueError(f"{path}: DoRA adapters (use_dora=true) cannot be imported as SVD-LoRA")
    if config.get("lora_bias"):
        raise ValueError(f"{path}: LoRA adapters with a bias (lora_bias=true) cannot be imported")
    return config


def _alpha_for(config: dict, name: str) -> float:
    """``alpha_pattern`` lookup with PEFT's rule (first key matching ``(.*\\.)?key$``)."""
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return float(alpha)
    return float(config.get("lora_alpha", 8))


def read_peft_lora(
    peft_dir: str | os.PathLike,
) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict[str, torch.Tensor]]:
    """Read a PEFT LoRA directory.

    Returns:
        ``(config, lora, saved)``: ``lora[name] = (B (d_out, r), A (r, d_in), scale)`` with
        PEFT's scaling ``scale``; ``saved["<module>.<param>"]`` the ``modules_to_save`` tensors.

    Raises:
        FileNotFoundError / ValueError: see :func:`read_peft_config`; missing or unreadable
            weights; embedding LoRA; a layer with only one of A and B.
    """
    config = read_peft_config(peft_dir)
    st_path = Path(peft_dir) / PEFT_WEIGHTS_NAME
    bin_path = Path(peft_dir) / "adapter_model.bin"
    try:
        if st_path.is_file():
            tensors = load_file(str(st_path))
        elif bin_path.is_file():
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(
                f"no {PEFT_WEIGHTS_NAME} or adapter_model.bin in {str(peft_dir)!r}"
            )
    except (SafetensorError, OSError, RuntimeError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"cannot read the PEFT weights in {str(peft_dir)!r}: {err}") from err
    factors: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if ".lora_embedding_" in name or ".lora_magnitude_vector" in name:
            raise ValueError(
                f"{str(peft_dir)!r} contains {key!r}: embedding LoRA and DoRA are not supported"
            )
        match = _LORA_KEY.match(name)
        if match:
            factors.setdefault(match["module"], {})[match["which"]] = value
        elif ".original_module." not in name:
            saved[_SAVED_WRAPPER.sub("", name)] = value
    use_rslora = bool(config.get("use_rslora"))
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{str(peft_dir)!r}: layer {name!r} has lora_{list(ab)} only")
        r = ab["A"].shape[0]
        alpha = _alpha_for(config, name)
        lora[name] = (ab["B"], ab["A"], alpha / math.sqrt(r) if use_rslora else alpha / r)
    return config, lora, saved


def _module(model: nn.Module, name: str, peft_dir) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"the base model has no module {name!r} named in the PEFT adapter {str(peft_dir)!r} "
            f"(adapter trained on another base model? base is {type(model).__name__})"
        ) from None


def import_peft_adapter(
    model: nn.Module,
    peft_dir: str | os.PathLike,
    *,
    scaling: float = 1.0,
    max_rank: int | None = None,
) -> dict[str, SVDLoRALinear]:
    """Put the PEFT LoRA adapter in ``peft_dir`` into ``model`` as adarank SVD-LoRA layers.

    Args:
        model: the plain base model the PEFT adapter was trained on (no adapters yet); modified
            in place.
        peft_dir: a PEFT LoRA directory (``adapter_config.json`` + weights).
        scaling: adarank scaling of the new layers (λ is divided by it, so outputs are unchanged).
        max_rank: capacity of the new layers for later growth (default ``min(d_in, d_out)``).

    Returns:
        ``{name: layer}`` of the new layers; the PEFT ``modules_to_save`` are copied into the
        model and kept trainable (and saved by :func:`adarank.save_adapter`).

    Raises:
        ValueError: not a LoRA adapter, a module missing from the model, a shape mismatch, or
            ``max_rank`` below an imported rank.
    """
    _, lora, saved = read_peft_lora(peft_dir)
    if not lora:
        raise ValueError(f"{str(peft_dir)!r} contains no LoRA layers")
    refactored: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for name, (B, A, scale) in lora.items():
        d_out, d_in = linear_shape(_module(model, name, peft_dir))
        if (B.shape[0], A.shape[1]) != (d_out, d_in):
            raise ValueError(
                f"shape mismatch for {name!r}: the base model layer is (d_out, d_in)="
                f"{(d_out, d_in)}, the PEFT adapter has B {tuple(B.shape)} and A "
                f"{tuple(A.shape)} (adapter trained on another base model?)"
            )
        P, lam, Q = refactor_lora(B, A, scale)
        if max_rank is not None and lam.numel() > max_rank:
            raise ValueError(
                f"max_rank={max_rank} is below the imported rank {lam.numel()} of {name!r}"
            )
        refactored[name] = (P, lam / scaling, Q)
    saved_modules = sorted({key.rsplit(".", 1)[0] for key in saved})
    for key, value in saved.items():
        mod_name, _, pname = key.rpartition(".")
        param = dict(_module(model, mod_name, peft_dir).named_parameters()).get(pname)
        if param is None or param.shape != value.shape:
            raise ValueError(
                f"saved module tensor {key!r} {tuple(value.shape)} does not fit the base model "
                f"({None if param is None else tuple(param.shape)})"
            )
    layers = add_adapters(
        model,
        [f"re:{re.escape(n)}" for n in refactored],
        {n: f[1].numel() for n, f in refactored.items()},
        scaling=scaling,
        max_rank=max_rank,
        modules_to_save=[f"re:{re.escape(m)}" for m in saved_modules] or None,
    )
    with torch.no_grad():
        for name, (P, lam, Q) in refactored.items():
            layer = layers[name]
            layer.lora_P.copy_(P)
            layer.lora_lambda.copy_(lam)
            layer.lora_Q.copy_(Q)
        for key, value in saved.items():
            mod_name, _, pname = key.rpartition(".")
            dict(model.get_submodule(mod_name).named_parameters())[pname].copy_(value)
    return layers
