"""Adapter files: ``adapter.safetensors`` (live triplets only) + ``adapter_config.json``.

Layout of ``adapter.safetensors`` (float32 unless the adapter dtype differs):
    ``<layer>.lora_P`` (d_out, r), ``<layer>.lora_lambda`` (r,), ``<layer>.lora_Q`` (r, d_in),
    ``<layer>.shift_P`` / ``<layer>.shift_Q`` when an init moved a low-rank part out of W0,
    ``<module>.<param>`` for every parameter of a ``modules_to_save`` module.

``adapter_config.json`` holds the format version, targets, per-layer rank, shape, scaling and
capacity, the saved modules, and a base-model fingerprint (per-layer weight shapes). Writes go to
a temporary file in the same directory, then ``os.replace`` (no half-written adapter).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

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


def _fingerprint(model: nn.Module, layer_names: list[str]) -> str:
    shapes = [f"{n}:{tuple(model.get_submodule(n).base_layer.weight.shape)}" for n in layer_names]
    return hashlib.sha256("\n".join(shapes).encode()).hexdigest()[:16]


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
    model: nn.Module, directory: str | os.PathLike, metadata: dict | None = None
) -> Path:
    """Write the live adapter triplets and ``modules_to_save`` of ``model`` to ``directory``.

    Args:
        model: a model with adapters (see :func:`add_adapters`).
        directory: created if missing.
        metadata: extra JSON-serialisable fields stored under ``"metadata"`` in the config.

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
        "base_fingerprint": _fingerprint(model, list(layers)),
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
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file may be truncated") from err
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
    return config


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, strict: bool = True) -> dict:
    """Load an adapter saved by :func:`save_adapter` into ``model``.

    If ``model`` has no adapters yet they are added at the saved layers (with the saved ranks,
    scalings and capacities); existing adapter layers are resized to the saved ranks. Outputs
    after loading equal those of the saved model. Everything is checked before the model is
    touched, so a failed load leaves the model as it was.

    Args:
        model: the base model (original weights), with or without adapters.
        directory: a directory written by :func:`save_adapter`.
        strict: require the model's adapter layers to be exactly the file's.

    Returns:
        the adapter config.

    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
        ValueError: truncated or foreign files, unknown version, a layer missing from the model
            or a shape mismatch (layer and both shapes named).
        RuntimeError: an adapter layer of the model is merged.
    """
    config = read_adapter_config(directory)
    weights_path = Path(directory) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read {weights_path} (truncated or corrupt?): {err}") from err
    cfg_layers: dict = config["layers"]
    layers = adapter_layers(model)
    fresh = not layers
    if fresh:
        missing = [n for n in cfg_layers if not _has_module(model, n)]
        if missing:
            raise ValueError(
                f"the model has no module(s) {missing[:5]} named in the adapter config"
            )
        shapes = {n: linear_shape(model.get_submodule(n)) for n in cfg_layers}
    else:
        if strict and set(layers) != set(cfg_layers):
            only_model = sorted(set(layers) - set(cfg_layers))[:5]
            only_file = sorted(set(cfg_layers) - set(layers))[:5]
            raise ValueError(
                f"adapter layers differ: in the model only {only_model}, in the file only "
                f"{only_file}"
            )
        shapes = {n: (layers[n].d_out, layers[n].d_in) for n in cfg_layers if n in layers}
        merged = [n for n in shapes if layers[n].merged]
        if merged:
            raise RuntimeError(f"layer(s) {merged[:5]} are merged; unmerge before loading")
    for name, (d_out, d_in) in shapes.items():
        _check_layer_tensors(name, cfg_layers[name], (d_out, d_in), tensors, weights_path)
    _check_saved_modules(model, config.get("modules_to_save", []), tensors, weights_path)

    if fresh:
        add_adapters(
            model,
            [f"re:{re.escape(n)}" for n in cfg_layers],
            {n: 0 for n in cfg_layers},
            modules_to_save=config.get("modules_to_save_patterns") or None,
            adapter_dtype=tensors[f"{next(iter(cfg_layers))}.lora_lambda"].dtype,
        )
        layers = adapter_layers(model)
    elif config.get("modules_to_save_patterns"):
        model._adarank_modules_to_save = config["modules_to_save_patterns"]
        mark_trainable(model, config["modules_to_save_patterns"])
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
    return config


def _check_layer_tensors(
    name: str, c: dict, shape: tuple[int, int], tensors: dict, path: Path
) -> None:
    """Check one layer's config entry and tensors against the model's (d_out, d_in)."""
    if shape != (c["d_out"], c["d_in"]):
        raise ValueError(
            f"shape mismatch for layer {name!r}: the model has (d_out, d_in)={shape}, "
            f"the adapter file has {(c['d_out'], c['d_in'])}"
        )
    d_out, d_in = shape
    r, k = int(c["rank"]), int(c.get("shift_rank", 0))
    if r > min(d_out, d_in):
        raise ValueError(f"layer {name!r}: saved rank {r} exceeds min(d_in, d_out)")
    expected = {"lora_P": (d_out, r), "lora_lambda": (r,), "lora_Q": (r, d_in)}
    if k:
        expected.update(shift_P=(d_out, k), shift_Q=(k, d_in))
    for key, want in expected.items():
        t = tensors.get(f"{name}.{key}")
        if t is None:
            raise ValueError(f"{path} lacks tensor {name}.{key} (truncated?)")
        if tuple(t.shape) != want:
            raise ValueError(
                f"tensor {name}.{key} in {path} has shape {tuple(t.shape)}, expected {want} "
                f"from the adapter config (rank {r})"
            )


def _check_saved_modules(model: nn.Module, names: list[str], tensors: dict, path: Path) -> None:
    for mod_name in names:
        if not _has_module(model, mod_name):
            raise ValueError(f"saved module {mod_name!r} does not exist in the model")
        for pname, p in model.get_submodule(mod_name).named_parameters():
            key = f"{mod_name}.{pname}"
            if key not in tensors:
                raise ValueError(f"{path} lacks saved-module tensor {key}")
            if tuple(p.shape) != tuple(tensors[key].shape):
                raise ValueError(
                    f"shape mismatch for saved module parameter {key!r}: model "
                    f"{tuple(p.shape)}, file {tuple(tensors[key].shape)}"
                )


def _apply_shift(layer, P0: torch.Tensor | None, Q0: torch.Tensor | None) -> None:
    """Make the layer's base shift equal to the file's (undo the old one, apply the new one)."""
    have = layer.shift_P.shape[1]
    if have:
        layer._add_to_base(layer.shift_weight(), +1.0)
        layer.shift_P = layer.shift_P[:, :0]
        layer.shift_Q = layer.shift_Q[:0]
    if P0 is not None and Q0 is not None and P0.shape[1]:
        layer.shift_base(P0, Q0)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
