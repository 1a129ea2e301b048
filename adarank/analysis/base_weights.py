"""Pre-trained weights W of the adapted layers, for the ΔW-vs-W analysis (LoRA Section 7.3).

Sources, tried in order by :func:`resolve_base_weights`:

1. a mapping ``{layer: W}`` or a model passed programmatically;
2. ``--base-weights FILE`` / ``RUN_DIR/base_weights.safetensors`` (keys ``<layer>.weight`` in
   ``(d_out, d_in)`` layout, written by :func:`save_base_weights`);
3. ``adarank.runs.load_run(run_dir).model`` (rebuilds the base model from ``config.yaml``).

W is the *original* pre-trained weight: for layers whose base was shifted by a data-aware init
(``W0 ← W − P0 Q0``) the shift is added back, and a merged adapter is subtracted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file
from safetensors.torch import save_file
from torch import nn

from adarank.analysis.run_files import BASE_WEIGHTS_NAME, AnalysisInputError
from adarank.modules.svd_lora import SVDLoRALinear, is_conv1d

__all__ = ["weights_from_model", "save_base_weights", "read_base_weights", "resolve_base_weights"]


def _layer_weight(module: nn.Module, name: str) -> torch.Tensor:
    """(d_out, d_in) float64 pre-trained weight of a (possibly adapted) linear module."""
    if isinstance(module, SVDLoRALinear):
        w = module.base_weight.detach().double()
        w = w.T if module.transposed else w
        if module.merged:
            w = w - module.delta_weight().double()
        if module.shift_P.shape[1]:
            w = w + module.shift_weight().double()
        return w
    if isinstance(module, nn.Linear):
        return module.weight.detach().double()
    if is_conv1d(module):
        return module.weight.detach().double().T
    raise TypeError(f"module {name!r} is a {type(module).__name__}, not a linear layer")


def weights_from_model(model: nn.Module, names: Iterable[str]) -> dict[str, np.ndarray]:
    """``{layer: W (d_out, d_in)}`` read from a model with or without adapters.

    Raises:
        AnalysisInputError: a layer name does not exist in the model.
    """
    out = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise AnalysisInputError(
                f"the model has no module {name!r} named by the adapter"
            ) from err
        with torch.no_grad():
            out[name] = _layer_weight(module, name).cpu().numpy()
    return out


def save_base_weights(
    model: nn.Module, path: str | os.PathLike, names: Iterable[str] | None = None
) -> Path:
    """Write the pre-trained W of the adapted layers to ``path`` (safetensors, atomic).

    Args:
        model: the model (with adapters: their layers are used when ``names`` is None).
        path: file to write, conventionally ``RUN_DIR/base_weights.safetensors``.
        names: layers to store; default every adapter layer.
    """
    from adarank.modules import adapter_layers
    from adarank.modules.adapter_io import _atomic_write

    names = list(adapter_layers(model)) if names is None else list(names)
    if not names:
        raise ValueError("no layers to save: pass names or a model with adapters")
    tensors = {
        f"{n}.weight": torch.from_numpy(w.astype(np.float32)).contiguous()
        for n, w in weights_from_model(model, names).items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp))
    return path


def read_base_weights(path: str | os.PathLike, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Read ``{layer: W}`` from a safetensors file with keys ``<layer>.weight`` (or ``<layer>``).

    Raises:
        AnalysisInputError: unreadable file or a layer missing from it.
    """
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AnalysisInputError(f"cannot read base weights {path}: {err}") from err
    out = {}
    for name in names:
        key = f"{name}.weight" if f"{name}.weight" in tensors else name
        if key not in tensors:
            raise AnalysisInputError(
                f"{path} has no tensor {name}.weight for adapter layer {name!r}"
            )
        out[name] = tensors[key].astype(np.float64)
    return out


def resolve_base_weights(
    run_dir: str | os.PathLike,
    names: list[str],
    *,
    base_weights: Mapping[str, object] | None = None,
    model: nn.Module | None = None,
    base_weights_path: str | os.PathLike | None = None,
) -> tuple[dict[str, np.ndarray] | None, str]:
    """Find W for every adapter layer; never raises for a base model that cannot be rebuilt.

    Returns:
        ``(weights, source)``; ``weights`` is None when no source worked and ``source`` then
        explains why (shown in the report).

    Raises:
        AnalysisInputError: an explicitly given source is unusable (missing layer, bad file).
    """
    if base_weights is not None:
        missing = [n for n in names if n not in base_weights]
        if missing:
            raise AnalysisInputError(f"base_weights lacks adapter layers {missing[:5]}")
        return {n: np.asarray(_to_numpy(base_weights[n]), dtype=np.float64) for n in names}, "given"
    if model is not None:
        return weights_from_model(model, names), "given model"
    if base_weights_path is not None:
        if not Path(base_weights_path).is_file():
            raise AnalysisInputError(f"base weights file {str(base_weights_path)!r} does not exist")
        return read_base_weights(base_weights_path, names), str(base_weights_path)
    default = Path(run_dir) / BASE_WEIGHTS_NAME
    if default.is_file():
        return read_base_weights(default, names), BASE_WEIGHTS_NAME
    try:
        from adarank.runs import load_run
    except ImportError as err:
        return None, (
            f"no base weights: adarank.runs is unavailable ({err}); pass --base-weights or "
            f"write {BASE_WEIGHTS_NAME}"
        )
    try:
        run = load_run(run_dir)
        return weights_from_model(run.model, names), "load_run(config.yaml)"
    except Exception as err:  # noqa: BLE001 - any failure to rebuild only skips this section
        return None, (
            f"no base weights: could not rebuild the base model from {Path(run_dir) / 'config.yaml'} "
            f"({type(err).__name__}: {err}); pass --base-weights or write {BASE_WEIGHTS_NAME}"
        )


def _to_numpy(w: object) -> np.ndarray:
    if isinstance(w, torch.Tensor):
        return w.detach().double().cpu().numpy()
    return np.asarray(w)
