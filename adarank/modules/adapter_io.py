"""Adapter files: ``adapter.safetensors`` (live triplets only) + ``adapter_config.json``.

Layout of ``adapter.safetensors`` (float32 unless the adapter dtype differs):
    ``<layer>.lora_P`` (d_out, r), ``<layer>.lora_lambda`` (r,), ``<layer>.lora_Q`` (r, d_in),
    ``<layer>.shift_P`` / ``<layer>.shift_Q`` when an init moved a low-rank part out of W0,
    ``<module>.<param>`` for every parameter of a ``modules_to_save`` module.

``adapter_config.json`` holds the format version, targets, per-layer rank, shape, scaling and
capacity, the saved modules, and a fingerprint of the original base weights of the adapted layers
(:mod:`adarank.modules.base_fingerprint`), which :func:`load_adapter` compares with the model.
Writes go to a temporary file in the same directory, then ``os.replace`` (no half-written
adapter). Loading checks everything first (:mod:`adarank.modules.adapter_checks`): a bad file is
a ``ValueError`` naming the file and the key or tensor, and leaves the model untouched.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from adarank.modules.adapter_checks import (
    check_config,
    check_layer_tensors,
    check_saved_modules,
    check_tensor_set,
    expected_tensor_keys,
    has_module,
)
from adarank.modules.base_fingerprint import METHOD, base_fingerprint, check_base_fingerprint
from adarank.modules.inject import (
    adapter_layers,
    add_adapters,
    mark_trainable,
    saved_modules,
)
from adarank.modules.svd_lora import linear_shape

__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "FORMAT_VERSION"]

FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write via ``write(tmp)`` to a temporary file next to ``path``, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; use the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    metadata: dict | None = None,
    *,
    fingerprint: dict | None = None,
) -> Path:
    """Write the live adapter triplets and ``modules_to_save`` of ``model`` to ``directory``.

    Args:
        model: a model with adapters (see :func:`add_adapters`).
        directory: created if missing.
        metadata: extra JSON-serialisable fields stored under ``"metadata"`` in the config.
        fingerprint: a :func:`~adarank.modules.base_fingerprint.base_fingerprint` record of this
            model's base taken earlier (the original weights never change), so that a model
            whose base is sharded across processes need not gather it; None computes it here.

    Returns:
        the directory path.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapter layers: call adarank.add_adapters first")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layer_cfg = {}
    for name, layer in layers.items():
        if layer.merged:
            raise RuntimeError(f"layer {name!r} is merged; unmerge before saving the adapter")
        tensors[f"{name}.lora_P"] = layer.lora_P.detach()
        tensors[f"{name}.lora_lambda"] = layer.lora_lambda.detach()
        tensors[f"{name}.lora_Q"] = layer.lora_Q.detach()
        if layer.shift_P.shape[1]:
            tensors[f"{name}.shift_P"] = layer.shift_P
            tensors[f"{name}.shift_Q"] = layer.shift_Q
        layer_cfg[name] = {
            "rank": layer.rank,
            "d_in": layer.d_in,
            "d_out": layer.d_out,
            "max_rank": layer.max_rank,
            "scaling": layer.scaling,
            "conv1d": layer.transposed,
            "shift_rank": int(layer.shift_P.shape[1]),
        }
    saved = saved_modules(model)
    for mod_name in saved:
        for pname, p in model.get_submodule(mod_name).named_parameters():
            tensors[f"{mod_name}.{pname}"] = p.detach()
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    config = {
        "format": "adarank-adapter",
        "format_version": FORMAT_VERSION,
        "layers": layer_cfg,
        "modules_to_save": saved,
        "modules_to_save_patterns": list(getattr(model, "_adarank_modules_to_save", [])),
        "adapter_params": sum(c["rank"] * (c["d_in"] + c["d_out"] + 1) for c in layer_cfg.values()),
        "base_fingerprint": (
            fingerprint if fingerprint is not None else base_fingerprint(model, list(layers))
        ),
        "base_model_class": type(model).__name__,
        "metadata": metadata or {},
    }
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"metadata must be JSON-serialisable: {err}") from err
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
    _atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text))
    return out


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """Read and check ``adapter_config.json`` in ``directory``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r} (not an adarank adapter?)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file may be truncated") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object")
    if config.get("format") != "adarank-adapter":
        raise ValueError(
            f"{path} is not an adarank adapter config (format={config.get('format')!r})"
        )
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unknown adapter format_version {version!r}; this adarank reads "
            f"version {FORMAT_VERSION}"
        )
    check_config(config, path)
    return config


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    strict: bool = True,
    check_base: bool = True,
) -> dict:
    """Load an adapter saved by :func:`save_adapter` into ``model``.

    If ``model`` has no adapters yet they are added at the saved layers (with the saved ranks,
    scalings and capacities); existing adapter layers are resized to the saved ranks. Outputs
    after loading equal those of the saved model. Everything is checked before the model is
    touched, so a failed load leaves the model as it was.

    Args:
        model: the base model (original weights), with or without adapters.
        directory: a directory written by :func:`save_adapter`.
        strict: require the model's adapter layers to be exactly the file's.
        check_base: compare the base weights of the adapted layers with the fingerprint in the
            file (a data-aware init's shift and the weight's dtype are allowed for). Files
            without a fingerprint load with a warning.

    Returns:
        the adapter config.

    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
        ValueError: truncated, foreign or malformed files (file and key or tensor named),
            unknown version, non-finite or non-float tensors, tensors the config does not
            describe, a layer missing from the model, a shape mismatch (layer and both shapes
            named), or base weights that differ from the ones the adapter was trained on.
        RuntimeError: an adapter layer of the model is merged.
    """
    config = read_adapter_config(directory)
    config_path = Path(directory) / CONFIG_NAME
    weights_path = Path(directory) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read {weights_path} (truncated or corrupt?): {err}") from err
    shapes = _model_shapes(model, config["layers"], strict, config_path)
    _check_file(model, config, shapes, tensors, weights_path)
    if check_base:
        check_adapter_base(config, model, list(shapes), config_path)
    _apply(model, config, shapes, tensors)
    return config


def _model_shapes(model: nn.Module, cfg_layers: dict, strict: bool, path: Path) -> dict:
    """``{layer: (d_out, d_in)}`` of the file's layers that will be loaded into ``model``."""
    layers = adapter_layers(model)
    if not layers:
        missing = [n for n in cfg_layers if not has_module(model, n)]
        if missing:
            raise ValueError(
                f"the model has no module(s) {missing[:5]} named in {path} (an adapter for "
                "another architecture?)"
            )
        return {n: linear_shape(model.get_submodule(n)) for n in cfg_layers}
    if strict and set(layers) != set(cfg_layers):
        only_model = sorted(set(layers) - set(cfg_layers))[:5]
        only_file = sorted(set(cfg_layers) - set(layers))[:5]
        raise ValueError(
            f"adapter layers differ: in the model only {only_model}, in {path} only {only_file}"
        )
    shapes = {n: (layers[n].d_out, layers[n].d_in) for n in cfg_layers if n in layers}
    merged = [n for n in shapes if layers[n].merged]
    if merged:
        raise RuntimeError(f"layer(s) {merged[:5]} are merged; unmerge before loading")
    return shapes


def _check_file(model: nn.Module, config: dict, shapes: dict, tensors: dict, path: Path) -> None:
    cfg_layers = config["layers"]
    for name, c in cfg_layers.items():
        shape = shapes.get(name, (c["d_out"], c["d_in"]))  # not loaded (strict=False): as saved
        check_layer_tensors(name, c, shape, tensors, path)
    check_saved_modules(model, config.get("modules_to_save", []), tensors, path)
    check_tensor_set(tensors, expected_tensor_keys(config, model), path)


def check_adapter_base(config: dict, model: nn.Module, names: list[str], path: Path) -> None:
    """Raise if the base weights of ``names`` in ``model`` differ from the adapter config's
    fingerprint (a config without one, or with an unknown method, warns instead)."""
    record = config.get("base_fingerprint")
    if not isinstance(record, dict):
        warnings.warn(
            f"{path} has no base-weight fingerprint (written by an older adarank), so the base "
            "model cannot be verified; re-save the adapter to record one",
            UserWarning,
            stacklevel=4,
        )
        return
    if record.get("method") != METHOD:
        warnings.warn(
            f"{path}: unknown base fingerprint method {record.get('method')!r} (a newer "
            f"adarank?); this one reads {METHOD!r}, so the base model is not verified",
            UserWarning,
            stacklevel=4,
        )
        return
    check_base_fingerprint(record, model, names, path)


def _apply(model: nn.Module, config: dict, shapes: dict, tensors: dict) -> None:
    """Modify ``model`` (everything was checked before)."""
    cfg_layers = config["layers"]
    fresh = not adapter_layers(model)
    if fresh:
        add_adapters(
            model,
            [f"re:{re.escape(n)}" for n in cfg_layers],
            {n: 0 for n in cfg_layers},
            modules_to_save=config.get("modules_to_save_patterns") or None,
            adapter_dtype=tensors[f"{next(iter(cfg_layers))}.lora_lambda"].dtype,
        )
    elif config.get("modules_to_save_patterns"):
        model._adarank_modules_to_save = config["modules_to_save_patterns"]
        mark_trainable(model, config["modules_to_save_patterns"])
    layers = adapter_layers(model)
    for name in shapes:
        layer, c = layers[name], cfg_layers[name]
        saved_cap = min(int(c.get("max_rank", c["rank"])), min(layer.d_in, layer.d_out))
        layer.max_rank = max(saved_cap, int(c["rank"])) if fresh else max(layer.max_rank, saved_cap)
        layer.scaling = float(c["scaling"])
        layer.set_rank(int(c["rank"]))
        with torch.no_grad():
            layer.lora_P.copy_(tensors[f"{name}.lora_P"])
            layer.lora_lambda.copy_(tensors[f"{name}.lora_lambda"])
            layer.lora_Q.copy_(tensors[f"{name}.lora_Q"])
        _apply_shift(layer, tensors.get(f"{name}.shift_P"), tensors.get(f"{name}.shift_Q"))
    for mod_name in config.get("modules_to_save", []):
        for pname, p in model.get_submodule(mod_name).named_parameters():
            with torch.no_grad():
                p.copy_(tensors[f"{mod_name}.{pname}"])


def _apply_shift(layer, P0: torch.Tensor | None, Q0: torch.Tensor | None) -> None:
    """Make the layer's base shift equal to the file's (undo the old one, apply the new one)."""
    have = layer.shift_P.shape[1]
    if have:
        layer._add_to_base(layer.shift_weight(), +1.0)
        layer.shift_P = layer.shift_P[:, :0]
        layer.shift_Q = layer.shift_Q[:0]
    if P0 is not None and Q0 is not None and P0.shape[1]:
        layer.shift_base(P0, Q0)
