r"""Layers that serve several adapters over one frozen base, per example in one forward pass.

LoRA notes that merged weights make it hard to batch inputs of different tasks together
(Hu et al. 2021, §4.2). Kept unmerged, the update of adapter ``a`` is low-rank,
``x ↦ P_a diag(λ_a) Q_a x`` (scaling and any init shift folded in, see
:mod:`adarank.export.factors`), so each example can take its own adapter at the cost of two thin
products and **no** merged ``d_out × d_in`` weight per adapter:

* ``"gather"``: the factors of all adapters are stacked and zero-padded to the largest rank
  ``R`` (zero padding adds nothing), gathered by example and applied with two ``bmm``::

      z = bmm(x_b, Q[ids]ᵀ)   (B, T, R);   y = baddbmm(y_base, z, (P diag λ)[ids]ᵀ)   (B, T, d_out)

* ``"group"``: the rows of each adapter are gathered and processed with that adapter's own
  factors and written back into their rows: no padding work when ranks differ a lot.

Index 0 of the stacks is the plain base (no update); adapters that do not touch a layer have a
zero update there. ``modules_to_save`` (e.g. classifier heads) differ per adapter too:
:class:`MultiSavedModule` swaps their parameters with ``torch.func.functional_call``; in a mixed
batch an ``nn.Linear`` head is gathered per example like the factors, any other module is run once
per adapter group on its rows (inputs and output must be batch-first tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from adarank.modules.svd_lora import linear_shape

__all__ = ["Router", "TensorSet", "MultiAdapterLinear", "MultiSavedModule"]

#: a Linear saved module is gathered per example only while ``batch × weight.numel()`` stays below
#: this (classifier heads); larger ones (e.g. a vocabulary head) are run per adapter group
GATHER_MAX_ELEMENTS = 1 << 24


@dataclass
class Router:
    """Which adapter each call uses; shared by every wrapped layer of one model."""

    names: list[str] = field(default_factory=list)  # adapter i+1 in the stacks
    active: str | None = None  # single-adapter mode
    ids: torch.Tensor | None = None  # (B,) mixed mode, 0 = base, i + 1 = names[i]
    groups: list[tuple[str | None, torch.Tensor]] = field(default_factory=list)  # (name, rows)
    mode: str = "gather"


class TensorSet(nn.Module):
    """Named tensors held as non-persistent buffers (they follow ``.to(device)``)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.keys = list(tensors)
        for i, value in enumerate(tensors.values()):
            self.register_buffer(f"t{i}", value.detach().clone(), persistent=False)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, f"t{i}") for i, k in enumerate(self.keys)}


def _check_batch(name: str, x: torch.Tensor, batch: int) -> None:
    if x.dim() == 0 or x.shape[0] != batch:
        raise ValueError(
            f"mixed-adapter batch: module {name!r} got an input of shape {tuple(x.shape)} but the "
            f"batch has {batch} examples; mixed batches need batch-first inputs"
        )


class MultiAdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` / ``Conv1D`` with the low-rank updates of several named adapters."""

    def __init__(self, base: nn.Module, router: Router, name: str) -> None:
        super().__init__()
        self.d_out, self.d_in = linear_shape(base)
        self.base_layer = base
        self.factors = nn.ModuleDict()  # adapter name -> TensorSet(B = P diag(λ), A = Q)
        self.__dict__["router"] = router  # shared, not a submodule
        self.layer_name = name
        self._stack: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(self, adapter: str, P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor) -> None:
        """Add adapter factors ``P`` (d_out, k), ``lam`` (k,) (scaling folded in), ``Q`` (k, d_in).

        They are kept as ``B = P diag(λ)`` and ``A = Q`` so a forward costs two matmuls.
        """
        dev = self.base_layer.weight.device
        B = P.float() * lam.float()  # (d_out, k)
        self.factors[adapter] = TensorSet({"B": B, "A": Q.float()}).to(dev)
        self._stack = None

    def remove(self, adapter: str) -> None:
        if adapter in self.factors:
            del self.factors[adapter]
        self._stack = None

    def invalidate(self) -> None:
        self._stack = None

    def _stacked(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``B (A+1, d_out, R)`` and ``A (A+1, R, d_in)``, zero-padded to the largest rank R."""
        if self._stack is None or self._stack[0].device != device:
            names = self.router.names
            ranks = {n: self.factors[n].t1.shape[0] for n in names if n in self.factors}
            R = max(ranks.values(), default=0)
            B = torch.zeros(len(names) + 1, self.d_out, R, device=device)
            A = torch.zeros(len(names) + 1, R, self.d_in, device=device)
            for i, n in enumerate(names, start=1):
                if n in ranks:
                    B[i, :, : ranks[n]], A[i, : ranks[n]] = self.factors[n].t0, self.factors[n].t1
            self._stack = (B, A)
        return self._stack

    def _add_delta(self, out: torch.Tensor, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """``out + B A x`` for one adapter, with the addition fused into the last matmul."""
        f = self.factors[adapter]
        z = x.reshape(-1, self.d_in).float() @ f.t1.T  # (N, k)
        if out.dtype == torch.float32:
            return torch.addmm(out.reshape(-1, self.d_out), z, f.t0.T).reshape(out.shape)
        return out + (z @ f.t0.T).reshape(out.shape).to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        router = self.router
        if router.ids is None:
            if router.active is None or router.active not in self.factors:
                return out
            return self._add_delta(out, router.active, x)
        _check_batch(self.layer_name, x, router.ids.shape[0])
        if router.mode == "group":
            out = out.clone()
            for adapter, rows in router.groups:
                if adapter is not None and adapter in self.factors:
                    rows = rows.to(x.device)
                    out[rows] = self._add_delta(out[rows], adapter, x[rows])
            return out
        B, A = self._stacked(x.device)
        if B.shape[-1] == 0:
            return out
        ids = router.ids.to(x.device)
        batch = x.shape[0]
        z = torch.bmm(x.reshape(batch, -1, self.d_in).float(), A[ids].transpose(1, 2))  # (B, T, R)
        Bt = B[ids].transpose(1, 2)  # (B, R, d_out)
        if out.dtype == torch.float32:
            return torch.baddbmm(out.reshape(batch, -1, self.d_out), z, Bt).reshape(out.shape)
        return out + torch.bmm(z, Bt).reshape(out.shape).to(out.dtype)


class MultiSavedModule(nn.Module):
    """A base module whose parameters are replaced per adapter (``modules_to_save``)."""

    def __init__(self, base: nn.Module, router: Router, name: str) -> None:
        super().__init__()
        self.base_module = base
        self.params = nn.ModuleDict()  # adapter name -> TensorSet of the module's parameters
        self.__dict__["router"] = router
        self.module_name = name
        self._stack: tuple[torch.Tensor, ...] | None = None

    def add(self, adapter: str, params: dict[str, torch.Tensor]) -> None:
        own = dict(self.base_module.named_parameters())
        dev = next(iter(own.values())).device if own else torch.device("cpu")
        self.params[adapter] = TensorSet({k: v.to(own[k].dtype) for k, v in params.items()}).to(dev)
        self._stack = None

    def remove(self, adapter: str) -> None:
        if adapter in self.params:
            del self.params[adapter]
        self._stack = None

    def invalidate(self) -> None:
        self._stack = None

    def _call(self, adapter: str | None, args: tuple, kwargs: dict):
        if adapter is None or adapter not in self.params:
            return self.base_module(*args, **kwargs)
        return functional_call(self.base_module, self.params[adapter].as_dict(), args, kwargs)

    def _stacked_linear(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-adapter ``weight (A+1, d_out, d_in)`` and ``bias (A+1, d_out)``; row 0 = base."""
        if self._stack is None or self._stack[0].device != device:
            base = self.base_module
            weights, biases = [base.weight], [base.bias]
            for n in self.router.names:
                p = self.params[n].as_dict() if n in self.params else {}
                weights.append(p.get("weight", base.weight))
                biases.append(p.get("bias", base.bias))
            w = torch.stack([t.detach() for t in weights]).to(device)
            b = None if base.bias is None else torch.stack([t.detach() for t in biases]).to(device)
            self._stack = (w, b)
        return self._stack

    def forward(self, *args, **kwargs):
        router = self.router
        if router.ids is None:
            return self._call(router.active, args, kwargs)
        batch = router.ids.shape[0]
        base = self.base_module
        gather = router.mode == "gather" and isinstance(base, nn.Linear) and len(args) == 1
        if gather and not kwargs and batch * base.weight.numel() <= GATHER_MAX_ELEMENTS:
            x = args[0]
            _check_batch(self.module_name, x, batch)
            w, b = self._stacked_linear(x.device)
            ids = router.ids.to(x.device)
            h = x.reshape(batch, -1, base.in_features)
            out = torch.bmm(h, w[ids].transpose(1, 2).to(h.dtype))  # (B, T, d_out)
            if b is not None:
                out = out + b[ids].unsqueeze(1).to(out.dtype)
            return out.reshape(*x.shape[:-1], base.out_features)
        out = None
        for adapter, rows in router.groups:
            sub_args = tuple(self._rows(a, rows, batch) for a in args)
            sub_kwargs = {k: self._rows(v, rows, batch) for k, v in kwargs.items()}
            y = self._call(adapter, sub_args, sub_kwargs)
            if not torch.is_tensor(y):
                raise TypeError(
                    f"mixed-adapter batch: saved module {self.module_name!r} returns "
                    f"{type(y).__name__}; only modules returning one batch-first tensor can be "
                    "split by adapter (use set_active_adapter for this model)"
                )
            if out is None:
                out = y.new_empty((batch, *y.shape[1:]))
            out[rows.to(y.device)] = y
        return out

    def _rows(self, value, rows: torch.Tensor, batch: int):
        if torch.is_tensor(value) and value.dim() > 0:
            _check_batch(self.module_name, value, batch)
            return value[rows.to(value.device)]
        return value
