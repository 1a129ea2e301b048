r"""Fingerprint of the frozen base weights an adapter was trained on.

An adapter file is only meaningful on top of the base weights it was trained with: loading it
into another checkpoint of the same architecture (say the base model instead of the instruct
model) gives the right shapes and silently wrong outputs. :func:`base_fingerprint` records, per
adapted layer, a few numbers that identify the *original* base weight ``W0`` (d_out, d_in) and
:func:`check_base_fingerprint` compares them with a model before an adapter is loaded into it.

Each layer keeps ``N_PROBES`` random bilinear probes ``uₖᵀ W0 vₖ`` with fixed Rademacher vectors
``uₖ, vₖ`` of unit norm (drawn from PCG64's raw bit stream, seeded by the layer's shape, so they
are the same in every process, on every device and in every numpy version), ``‖W0‖_F`` for the
messages, and the size of the rounding noise the weight may carry. The cost is ``N_PROBES``
matrix-vector products per layer (about 0.5 s for the 106M adapted weights of a 135M model on
one CPU core, float32 or bfloat16).

``W0`` is the *original* weight also when the model's base was changed in place: a data-aware
init's shift (``W0 − shift_P shift_Q``) is added back and a merged ΔW is subtracted. Those
operations round the weight (as does loading a bf16 copy of an fp32 base), so the probes are
compared with a tolerance of ``TOLERANCE`` standard deviations of that rounding noise: for a
Rademacher probe, noise ``e`` contributes ``uᵀ e v`` with standard deviation ``‖e‖_F /
√(d_out d_in)``, where ``‖e‖_F ≤ u·‖W‖_F`` (``u`` the unit roundoff of the weight's dtype, at
least float32's because shifts and merges are computed in float32), plus the float32 rounding
of the products themselves. A different checkpoint moves every probe by about
``‖W0 − W0'‖_F / √(d_out d_in)``: an untouched base in the same dtype is told apart from weights
that differ by a few 1e-5 of their norm; a base shifted by an init in bfloat16 from weights that
differ by more than about 3%.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import nn

from adarank.modules.svd_lora import SVDLoRALinear, is_conv1d, linear_shape

__all__ = [
    "METHOD",
    "N_PROBES",
    "TOLERANCE",
    "base_fingerprint",
    "check_base_fingerprint",
    "differing_layers",
]

METHOD = "rademacher-probes-v1"
N_PROBES = 4
#: tolerance in standard deviations of the rounding noise of both weights
TOLERANCE = 8.0
_SEED = 0xADA7A4C
_BLOCK = 1 << 20  # elements converted at a time


def _unit_roundoff(dtype: torch.dtype) -> float:
    return max(torch.finfo(dtype).eps / 2, torch.finfo(torch.float32).eps / 2)


def _signs(d_out: int, d_in: int) -> tuple[np.ndarray, np.ndarray]:
    """±1 matrices ``(d_out, N_PROBES)``, ``(d_in, N_PROBES)`` fixed by the layer's shape."""

    def draw(n: int, side: int) -> np.ndarray:
        raw = np.random.PCG64([_SEED, d_out, d_in, side]).random_raw(n * N_PROBES)
        bits = (raw >> np.uint64(63)).astype(np.float64).reshape(n, N_PROBES)
        return 1.0 - 2.0 * bits

    return draw(d_out, 0), draw(d_in, 1)


def _low_rank_change(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(L, R)`` float64 with ``W0 = W_now + L R``: the shift added back, a merged ΔW removed."""
    if not isinstance(module, SVDLoRALinear):
        return None
    lefts, rights = [], []
    if module.shift_P.shape[1]:
        lefts.append(module.shift_P.detach().double())
        rights.append(module.shift_Q.detach().double())
    if module.merged and module.rank:
        lam = module.lora_lambda.detach().double()
        lefts.append(-module.scaling * module.lora_P.detach().double() * lam)
        rights.append(module.lora_Q.detach().double())
    if not lefts:
        return None
    return torch.cat(lefts, 1), torch.cat(rights, 0)


def _products(w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(w @ x as float64 on the CPU, ‖w‖_F)`` for a (d_out, d_in) weight view of any dtype.

    Rows are converted to ``x``'s dtype in blocks of at most ``_BLOCK`` elements through one
    reused buffer (no full-size copy of a bf16 weight), with one matrix-vector product per column of ``x`` (faster than a
    thin matrix product on CPUs).
    """
    d_out, d_in = w.shape
    rows = max(1, _BLOCK // d_in)
    buf = torch.empty(min(rows, d_out), d_in, dtype=x.dtype, device=x.device)
    out, norm2 = [], 0.0
    for start in range(0, d_out, rows):
        part = w[start : start + rows]
        if part.dtype != x.dtype:
            part = buf[: part.shape[0]].copy_(part)
        out.append(torch.stack([torch.mv(part, col) for col in x.T], 1))
        norm2 += float(torch.linalg.vector_norm(part)) ** 2
    return torch.cat(out).double().cpu(), math.sqrt(norm2)


def _layer_record(module: nn.Module) -> dict:
    """Probes, norm and rounding noise (``‖e‖_F`` bound) of the original base weight of a layer.

    One pass over the weight (float32 on the CPU, float64 elsewhere, never TF32); a low-rank
    change is added through its factors.
    """
    base = _base(module)
    linear_shape(base)  # TypeError for anything but Linear / Conv1D
    weight = base.weight.detach()
    work = torch.float32 if weight.device.type == "cpu" else torch.float64
    w = weight.T if is_conv1d(base) else weight  # (d_out, d_in) view
    d_out, d_in = w.shape
    U, V = (torch.from_numpy(a) for a in _signs(d_out, d_in))
    change = _low_rank_change(module)
    x = V if change is None else torch.cat([V, change[1].cpu().T], 1)  # W_now Rᵀ for the norm
    y, norm_now = _products(w, x.to(weight.device, work))
    probes = (U * y[:, :N_PROBES]).sum(0)
    norm2 = norm_now**2
    noise = _unit_roundoff(torch.float32) * math.sqrt(d_in) * norm_now  # the products
    if change is not None:
        L, R = (t.cpu() for t in change)
        probes += ((U.T @ L) * (R @ V).T).sum(1)
        lr_norm2 = float(((L.T @ L) * (R @ R.T)).sum())
        norm2 += 2 * float((L * y[:, N_PROBES:]).sum()) + lr_norm2  # (cancels: messages only)
        noise += _unit_roundoff(weight.dtype) * (norm_now + math.sqrt(max(lr_norm2, 0.0)))
    return {
        "dtype": str(weight.dtype).removeprefix("torch."),
        "norm": math.sqrt(max(norm2, 0.0)),
        "noise": noise,
        "probes": (probes / math.sqrt(d_out * d_in)).tolist(),
    }


def _tolerance(entry: dict, mine: dict, d_out: int, d_in: int) -> float:
    """Allowed probe difference: ``TOLERANCE`` × the rounding noise of both sides (in-place
    changes, float32 products, and a cast when the dtypes differ)."""
    noise = float(entry["noise"]) + mine["noise"]
    norm = max(float(entry["norm"]), mine["norm"])
    if entry.get("dtype") != mine["dtype"]:  # one side is a rounded copy of the other
        coarser = max(
            _unit_roundoff(_dtype(entry.get("dtype"))), _unit_roundoff(_dtype(mine["dtype"]))
        )
        noise += coarser * norm
    return TOLERANCE * noise / math.sqrt(d_out * d_in)


def _dtype(name: object) -> torch.dtype:
    """A recorded dtype name (unknown names count as the coarsest float, bfloat16)."""
    dtype = getattr(torch, str(name), None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


def base_fingerprint(model: nn.Module, names: list[str]) -> dict:
    """Fingerprint the original base weights of the linear layers ``names`` of ``model``.

    Args:
        model: a model whose modules ``names`` are ``nn.Linear`` / ``Conv1D`` or adapter layers.
        names: qualified module names.

    Returns:
        ``{"method": METHOD, "layers": {name: {"dtype", "norm", "noise", "probes"}}}``
        (JSON-serialisable).
    """
    with torch.no_grad():
        layers = {n: _layer_record(model.get_submodule(n)) for n in names}
    return {"method": METHOD, "layers": layers}


def _recorded_layer(record: dict, name: str, where: str) -> dict:
    entry = record["layers"].get(name) if isinstance(record.get("layers"), dict) else None
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: key 'base_fingerprint' has no entry for layer {name!r}")
    probes = entry.get("probes")
    ok = (
        isinstance(probes, list)
        and len(probes) == N_PROBES
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in probes)
        and all(isinstance(entry.get(k), (int, float)) for k in ("norm", "noise"))
    )
    if not ok:
        raise ValueError(
            f"{where}: key 'base_fingerprint'.'layers'.{name!r} is malformed: expected "
            f"'probes' ({N_PROBES} numbers), 'norm' and 'noise', got {entry!r}"
        )
    return entry


def differing_layers(
    record: dict, model: nn.Module, names: list[str], where: str | os.PathLike
) -> list[tuple[str, float, float]]:
    """The layers of ``names`` whose original base weight in ``model`` differs from ``record``.

    Args:
        record: a :func:`base_fingerprint` result.
        model: the model to compare.
        names: the layers to compare (they must all be in ``record``).
        where: the file the record comes from, named in messages.

    Returns:
        ``[(name, recorded ‖W0‖_F, current ‖W0‖_F)]`` for each layer beyond the tolerance.

    Raises:
        ValueError: a malformed record.
    """
    differ = []
    with torch.no_grad():
        for name in names:
            entry = _recorded_layer(record, name, str(where))
            mine = _layer_record(model.get_submodule(name))
            tol = _tolerance(entry, mine, *linear_shape(_base(model.get_submodule(name))))
            gap = max(abs(a - b) for a, b in zip(entry["probes"], mine["probes"]))
            if not gap <= tol:  # also catches NaN
                differ.append((name, float(entry["norm"]), mine["norm"]))
    return differ


def check_base_fingerprint(
    record: dict, model: nn.Module, names: list[str], where: str | os.PathLike
) -> None:
    """Raise if the original base weights of ``names`` in ``model`` differ from ``record``.

    Args:
        record: a :func:`base_fingerprint` result (from an adapter config).
        model: the model the adapter is about to be loaded into.
        names: the layers to compare (they must all be in ``record``).
        where: the config file, named in messages.

    Raises:
        ValueError: a malformed record, or base weights that differ (layers, recorded and
            current norms named, with how to opt out).
    """
    differ = differing_layers(record, model, names, where)
    if differ:
        shown = ", ".join(
            f"{n!r} (‖W0‖ recorded {a:.6g}, this model {b:.6g})" for n, a, b in differ[:3]
        )
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise ValueError(
            f"the adapter ({where}) was trained on other base weights: {len(differ)} of "
            f"{len(names)} adapted layer(s) have the right shape but different weights: "
            f"{shown}{more}. Load it into the base model it was trained on, or pass "
            "check_base=False to load_adapter to skip this check."
        )


def _base(module: nn.Module) -> nn.Module:
    """The original linear layer of an adapter wrapper (adarank's, a serving wrapper with a
    ``base_layer``) or the layer itself."""
    return getattr(module, "base_layer", module)
