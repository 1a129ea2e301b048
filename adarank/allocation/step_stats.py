"""One optimizer step's per-slot statistics of every adapter layer, packed into one buffer.

The controller needs, per live triplet and per step, ``Σ (Qx)²`` (recorded in the forward by the
hooks of :mod:`adarank.allocation.capture`) and the few vectors its scorer asks for
(:meth:`~adarank.allocation.importance.Scorer.slot_stats`, e.g. λ, ‖p‖ and ∂L/∂λ). Gathering them layer by layer would cost a few small operations and a host
synchronisation per layer (≈100–150 device syncs per step on a GPU); here every layer's vectors
are concatenated where the layers live, the token sums are all-reduced once under DDP, and the
whole buffer is copied to the host once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

__all__ = ["StepStats", "gather_step_stats"]


@dataclass
class StepStats:
    """Host (float64) statistics of one step, every slot of every layer in ``layers`` order."""

    layers: list[tuple[str, object]]  # (name, layer) in packing order
    z_sum: torch.Tensor  # Σ (Qx)² of all slots
    counts: list[float]  # tokens behind z_sum, per layer
    stats: dict[str, torch.Tensor]  # scorer key -> all slots
    valid: list[bool]  # per layer: False = leave its scorer state untouched this step


def gather_step_stats(
    layers: Mapping[str, object],
    captures: Mapping[str, object],
    scorer,
    dist=None,
    warn: Callable[[str, str], None] = lambda key, message: None,
) -> StepStats:
    """Pop each layer's forward statistics and the scorer's slot vectors; pack, reduce, copy.

    Args:
        layers: ``{name: SVDLoRALinear}``.
        captures: ``{name: LayerCapture}`` of the same layers
            (:func:`~adarank.allocation.capture.install_capture`): their forward statistics.
        scorer: the :class:`~adarank.allocation.importance.Scorer` (its ``stat_keys`` and
            ``slot_stats``).
        dist: ``torch.distributed`` when more than one process trains, else ``None``.
        warn: ``warn(key, message)`` for a layer without gradients or with non-finite values
            (its entry is then marked invalid).
    """
    keys = scorer.stat_keys
    items, z_parts, counts, valid = [], [], [], []
    s_parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    home = next(iter(layers.values())).lora_lambda.device
    for name, layer in layers.items():
        z_sum, count = captures[name].pop_stats()
        stats = scorer.slot_stats(layer) if layer.rank else {}
        if stats is None:
            warn(f"nograd:{name}", f"no gradient for adapter {name!r}: importance update skipped")
        items.append((name, layer))
        valid.append(stats is not None)
        z_parts.append(z_sum.to(home))
        counts.append(float(count))
        for k in keys:
            v = stats.get(k) if stats else None
            s_parts[k].append(z_sum.new_zeros(layer.rank) if v is None else v.to(home))
    # float32 sums are exact enough; the all-reduce and the scorer maths run in float64
    zbuf = torch.cat([*z_parts, torch.tensor(counts, device=home)]).double()
    if dist is not None:  # Σ (Qx)² and token counts over processes (gradients are synced)
        dist.all_reduce(zbuf)
    rest = [t for k in keys for t in s_parts[k]]
    host = torch.cat([zbuf, torch.cat(rest).double()] if rest else [zbuf]).cpu()  # one copy
    n, n_layers = zbuf.numel() - len(items), len(items)
    z_all, counts = host[:n], host[n : n + n_layers].tolist()
    stats = {k: host[n + n_layers + i * n : n + n_layers + (i + 1) * n] for i, k in enumerate(keys)}
    if not bool(torch.isfinite(host).all()):  # rare: find the layers and leave them out
        off = 0
        for i, (name, layer) in enumerate(items):
            sl = slice(off, off + layer.rank)
            off += layer.rank
            if not all(bool(torch.isfinite(v[sl]).all()) for v in (z_all, *stats.values())):
                valid[i] = False
                warn(
                    f"nonfinite:{name}",
                    f"non-finite gradients or statistics in {name!r}: importance update skipped",
                )
    return StepStats(items, z_all, counts, stats, valid)
