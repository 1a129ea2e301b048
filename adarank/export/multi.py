"""Several named adarank adapters on one frozen base: switching and mixed-adapter batches.

Cheap task switching by swapping adapters is LoRA's deployment story (Hu et al. 2021, §4.2);
this wrapper keeps one copy of the base weights, loads any number of native adapter directories
by name, switches the active one without touching the base, and serves a batch whose examples use
different adapters in **one** forward pass (see :mod:`adarank.export.multi_layers` for the maths).

Example::

    server = MultiAdapterModel(AutoModelForSequenceClassification.from_pretrained(path))
    server.load_adapter("sst2", "runs/sst2/adapter")
    server.load_adapter("imdb", "runs/imdb/adapter")
    server.set_active_adapter("sst2"); logits = server(**batch).logits
    logits = server(**batch, adapter_ids=["sst2", "imdb", None, "sst2"]).logits  # None = base

The base must hold the **original** pretrained weights: an adapter whose init shifted the base
(``shift_P shift_Q``) carries that shift as extra negative-λ triplets, so every adapter is applied
relative to the same weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from adarank.export.multi_layers import MultiAdapterLinear, MultiSavedModule, Router
from adarank.modules import SVDLoRALinear, read_adapter_config
from adarank.modules.adapter_io import CONFIG_NAME, WEIGHTS_NAME, check_adapter_base
from adarank.modules.svd_lora import is_conv1d, linear_shape

__all__ = ["MultiAdapterModel"]

MIXED_MODES = ("gather", "group")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class MultiAdapterModel(nn.Module):
    """Serve several named adapters over one base model.

    Args:
        model: the plain base model (original weights, no adarank adapters); wrapped in place.
        mixed_mode: ``"gather"`` (stack factors padded to the largest rank, two ``bmm``) or
            ``"group"`` (rows of each adapter processed with its own factors).

    Raises:
        ValueError: the model already contains adarank adapter layers, or a bad ``mixed_mode``.
    """

    def __init__(self, model: nn.Module, *, mixed_mode: str = "gather") -> None:
        super().__init__()
        if any(isinstance(m, SVDLoRALinear) for m in model.modules()):
            raise ValueError(
                "MultiAdapterModel needs the plain base model; this one already has adarank "
                "adapter layers (build a fresh base, or merge/export first)"
            )
        if mixed_mode not in MIXED_MODES:
            raise ValueError(f"mixed_mode={mixed_mode!r}; expected one of {MIXED_MODES}")
        self.model = model
        self.router = Router(mode=mixed_mode)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def adapter_names(self) -> list[str]:
        """Loaded adapter names, in load order."""
        return list(self.router.names)

    @property
    def active_adapter(self) -> str | None:
        return self.router.active

    def _wrappers(self) -> dict[str, MultiAdapterLinear | MultiSavedModule]:
        return {
            n: m
            for n, m in self.model.named_modules()
            if isinstance(m, MultiAdapterLinear | MultiSavedModule)
        }

    def _check_name(self, name: str | None) -> None:
        if name is not None and name not in self.router.names:
            raise ValueError(
                f"unknown adapter {name!r}; loaded adapters: {self.router.names} (None = base)"
            )

    def _module(self, name: str, directory) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"adapter {str(directory)!r} names module {name!r}, which the base model "
                f"{type(self.model).__name__} does not have (adapter for another base?)"
            ) from None

    # ------------------------------------------------------------------ loading
    def load_adapter(
        self, name: str, directory: str | os.PathLike, *, check_base: bool = True
    ) -> dict:
        """Load a native adapter directory under ``name`` (the base is not copied or changed).

        Args:
            name: the name to serve it under (no ``.``).
            directory: a directory written by :func:`adarank.modules.save_adapter`.
            check_base: compare the base weights of the adapted layers with the fingerprint
                the adapter recorded (as :func:`adarank.modules.load_adapter` does); files
                without one load with a warning.

        Returns:
            the adapter config.

        Raises:
            ValueError: bad or duplicate name, foreign/corrupt files, modules missing from the
                base or of another shape, base weights other than the ones the adapter was
                trained on, or a saved module that overlaps an adapted layer.
        """
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
        if name in self.router.names:
            raise ValueError(f"adapter {name!r} is already loaded; delete_adapter({name!r}) first")
        config = read_adapter_config(directory)
        path = Path(directory) / WEIGHTS_NAME
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read {path}: {err}") from err
        layers, saved = self._prepare(config, tensors, directory)
        if check_base:
            check_adapter_base(
                config, self.model, list(config["layers"]), Path(directory) / CONFIG_NAME
            )
        wrappers = self._wrappers()
        saved_names = {n for n, m in wrappers.items() if isinstance(m, MultiSavedModule)}
        saved_names |= set(saved)
        layer_names = {n for n, m in wrappers.items() if isinstance(m, MultiAdapterLinear)}
        layer_names |= set(layers)
        for s in saved_names:
            for other in (saved_names - {s}) | layer_names:
                if other.startswith(s + ".") or s.startswith(other + "."):
                    raise ValueError(
                        f"adapter {name!r}: saved module {s!r} overlaps {other!r}; nested "
                        "saved modules and adapted layers cannot be served together"
                    )
        # validation done: now modify the model
        for layer_name, (P, lam, Q) in layers.items():
            module = self.model.get_submodule(layer_name)
            if not isinstance(module, MultiAdapterLinear):
                module = MultiAdapterLinear(module, self.router, layer_name)
                _set_submodule(self.model, layer_name, module)
            module.add(name, P, lam, Q)
        for mod_name, params in saved.items():
            module = self.model.get_submodule(mod_name)
            if not isinstance(module, MultiSavedModule):
                module = MultiSavedModule(module, self.router, mod_name)
                _set_submodule(self.model, mod_name, module)
            module.add(name, params)
        self.router.names.append(name)
        for module in self._wrappers().values():
            module.invalidate()
        return config

    def _prepare(self, config: dict, tensors: dict, directory) -> tuple[dict, dict]:
        """Check the files against the base; return layer factors and saved-module tensors."""
        layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for layer_name, c in config["layers"].items():
            module = self._module(layer_name, directory)
            base = module.base_layer if isinstance(module, MultiAdapterLinear) else module
            if not (isinstance(base, nn.Linear) or is_conv1d(base)):
                raise ValueError(
                    f"module {layer_name!r} is a {type(base).__name__}, not a linear layer"
                )
            if linear_shape(base) != (c["d_out"], c["d_in"]):
                raise ValueError(
                    f"shape mismatch for layer {layer_name!r}: the base has (d_out, d_in)="
                    f"{linear_shape(base)}, the adapter {(c['d_out'], c['d_in'])}"
                )
            try:
                P = tensors[f"{layer_name}.lora_P"].float()
                lam = tensors[f"{layer_name}.lora_lambda"].float() * float(c["scaling"])
                Q = tensors[f"{layer_name}.lora_Q"].float()
            except KeyError as err:
                raise ValueError(f"{directory}: missing tensor {err} (truncated?)") from None
            if f"{layer_name}.shift_P" in tensors:
                sP, sQ = tensors[f"{layer_name}.shift_P"], tensors[f"{layer_name}.shift_Q"]
                P = torch.cat([P, sP.float()], dim=1)
                lam = torch.cat([lam, torch.full((sP.shape[1],), -1.0)])
                Q = torch.cat([Q, sQ.float()], dim=0)
            if lam.numel():
                layers[layer_name] = (P, lam, Q)
        saved: dict[str, dict[str, torch.Tensor]] = {}
        for mod_name in config.get("modules_to_save", []):
            module = self._module(mod_name, directory)
            base = module.base_module if isinstance(module, MultiSavedModule) else module
            params = {}
            for pname, p in base.named_parameters():
                key = f"{mod_name}.{pname}"
                if key not in tensors or tensors[key].shape != p.shape:
                    got = tuple(tensors[key].shape) if key in tensors else None
                    raise ValueError(
                        f"saved module tensor {key!r}: the base has {tuple(p.shape)}, the "
                        f"adapter {got}"
                    )
                params[pname] = tensors[key]
            saved[mod_name] = params
        return layers, saved

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (the base and the other adapters are unchanged)."""
        self._check_name(name)
        for module in self._wrappers().values():
            module.remove(name)
        self.router.names.remove(name)
        if self.router.active == name:
            self.router.active = None
        for module in self._wrappers().values():
            module.invalidate()

    # ------------------------------------------------------------------ routing
    def set_active_adapter(self, name: str | None) -> None:
        """Use adapter ``name`` for every example of later calls (None: the plain base)."""
        self._check_name(name)
        self.router.active = name

    def _resolve(self, adapter_ids: Sequence[str | None]) -> torch.Tensor:
        if isinstance(adapter_ids, str) or not isinstance(adapter_ids, Sequence):
            raise TypeError(
                "adapter_ids must be a sequence with one adapter name (or None) per example, "
                f"got {type(adapter_ids).__name__}"
            )
        index = {n: i for i, n in enumerate(self.router.names, start=1)}
        ids = []
        for a in adapter_ids:
            if a is not None and a not in index:
                self._check_name(a)
            ids.append(0 if a is None else index[a])
        return torch.tensor(ids, dtype=torch.long)

    @contextlib.contextmanager
    def route(self, adapter_ids: Sequence[str | None]) -> Iterator[None]:
        """Within the block, example ``b`` of every call uses adapter ``adapter_ids[b]``.

        Useful around ``model.generate`` or any call that does not go through :meth:`forward`.
        """
        ids = self._resolve(adapter_ids)
        groups = []
        for idx in torch.unique(ids).tolist():
            rows = torch.nonzero(ids == idx).flatten()
            groups.append((None if idx == 0 else self.router.names[idx - 1], rows))
        saved = (self.router.ids, self.router.groups)
        self.router.ids, self.router.groups = ids, groups
        try:
            yield
        finally:
            self.router.ids, self.router.groups = saved

    def forward(self, *args, adapter_ids: Sequence[str | None] | None = None, **kwargs):
        """Call the base model; with ``adapter_ids`` each example uses its own adapter."""
        if adapter_ids is None:
            return self.model(*args, **kwargs)
        with self.route(adapter_ids):
            return self.model(*args, **kwargs)
