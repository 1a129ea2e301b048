"""Checks of adapter files before anything is loaded: config schema, tensor set, values.

Every problem is a ``ValueError`` naming the file and the key or tensor at fault, so a
hand-edited, truncated or foreign file never surfaces as a bare ``KeyError`` or as NaN outputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "check_config",
    "check_layer_tensors",
    "check_saved_modules",
    "check_tensor_set",
    "expected_tensor_keys",
    "has_module",
]

#: required integer fields of a layer entry (minimum value)
_LAYER_INTS = {"rank": 0, "d_in": 1, "d_out": 1}
#: optional integer fields of a layer entry (minimum value)
_LAYER_OPTIONAL_INTS = {"max_rank": 0, "shift_rank": 0}
TRIPLET_KEYS = ("lora_P", "lora_lambda", "lora_Q")
SHIFT_KEYS = ("shift_P", "shift_Q")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_str_list(config: dict, key: str, path: Path) -> None:
    value = config.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{path}: key {key!r} must be a list of strings, got {value!r}")


def _check_layer_entry(name: str, c: object, path: Path) -> None:
    where = f"{path}: key 'layers'.{name!r}"
    if not isinstance(c, dict):
        raise ValueError(f"{where} must be an object, got {c!r}")
    for key, low in _LAYER_INTS.items():
        if key not in c:
            raise ValueError(f"{where} lacks {key!r}")
        if not _is_int(c[key]) or c[key] < low:
            raise ValueError(f"{where}.{key!r} must be an integer ≥ {low}, got {c[key]!r}")
    for key, low in _LAYER_OPTIONAL_INTS.items():
        if key in c and (not _is_int(c[key]) or c[key] < low):
            raise ValueError(f"{where}.{key!r} must be an integer ≥ {low}, got {c[key]!r}")
    s = c.get("scaling")
    if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or s <= 0:
        raise ValueError(f"{where}.'scaling' must be a positive finite number, got {s!r}")
    if c["rank"] > min(c["d_in"], c["d_out"]):
        raise ValueError(
            f"{where}: rank {c['rank']} exceeds min(d_in, d_out) = {min(c['d_in'], c['d_out'])}"
        )


def check_config(config: dict, path: Path) -> None:
    """Check the structure of a parsed ``adapter_config.json`` (after format and version).

    Raises:
        ValueError: naming ``path`` and the key at fault.
    """
    layers = config.get("layers")
    if "layers" not in config:
        raise ValueError(f"{path} lacks the key 'layers' (the adapted layers and their ranks)")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path}: key 'layers' must be a non-empty object, got {layers!r}")
    for name, c in layers.items():
        _check_layer_entry(name, c, path)
    _check_str_list(config, "modules_to_save", path)
    _check_str_list(config, "modules_to_save_patterns", path)
    fingerprint = config.get("base_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, (str, dict)):
        raise ValueError(f"{path}: key 'base_fingerprint' must be an object, got {fingerprint!r}")
    if not isinstance(config.get("metadata", {}), dict):
        raise ValueError(f"{path}: key 'metadata' must be an object")


def expected_tensor_keys(config: dict, model: nn.Module) -> set[str]:
    """Every tensor name the config describes (layers, shifts, saved-module parameters)."""
    keys = set()
    for name, c in config["layers"].items():
        keys.update(f"{name}.{k}" for k in TRIPLET_KEYS)
        if c.get("shift_rank", 0):
            keys.update(f"{name}.{k}" for k in SHIFT_KEYS)
    for mod_name in config.get("modules_to_save", []):
        keys.update(f"{mod_name}.{p}" for p, _ in model.get_submodule(mod_name).named_parameters())
    return keys


def check_tensor_set(tensors: dict, expected: set[str], path: Path) -> None:
    """No tensor the config does not describe; every tensor floating point and finite."""
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(
            f"{path} holds tensor(s) {extra[:5]} that the adapter config does not describe "
            "(a file from another adapter or a hand-edited one?)"
        )
    for key in sorted(tensors):
        t = tensors[key]
        if not t.is_floating_point():
            raise ValueError(
                f"tensor {key} in {path} has dtype {t.dtype}; adapter tensors are floating point"
            )
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(
                f"tensor {key} in {path} has {bad} non-finite value(s) (NaN/inf) out of "
                f"{t.numel()}: the adapter is corrupt or its training diverged"
            )


def check_layer_tensors(
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
                f"from the adapter config (rank {r}, shift_rank {k})"
            )


def has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def check_saved_modules(model: nn.Module, names: list[str], tensors: dict, path: Path) -> None:
    """Every ``modules_to_save`` module exists and the file holds all its parameters."""
    for mod_name in names:
        if not has_module(model, mod_name):
            raise ValueError(
                f"saved module {mod_name!r} named in the adapter config next to {path} does not "
                "exist in the model"
            )
        for pname, p in model.get_submodule(mod_name).named_parameters():
            key = f"{mod_name}.{pname}"
            if key not in tensors:
                raise ValueError(f"{path} lacks saved-module tensor {key}")
            if tuple(p.shape) != tuple(tensors[key].shape):
                raise ValueError(
                    f"shape mismatch for saved module parameter {key!r}: model "
                    f"{tuple(p.shape)}, file {tuple(tensors[key].shape)} in {path}"
                )
