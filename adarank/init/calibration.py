r"""Calibration pass: input second moments and full-weight gradients of the adapter layers.

We hook the **adapter layers** (``adarank.adapter_layers(model)``, i.e. after
``add_adapters``): at calibration time every adapter has ΔW = 0, so the hooked inputs are
exactly the base model's activations, and the layer names match the adapter's.

* Input statistics: a forward pre-hook on each :class:`SVDLoRALinear` feeds its input rows
  into a :class:`SecondMomentAccumulator` (``d_in ≤ sketch_threshold``) or a
  :class:`NystromSketch`. Layers that receive the *same* input tensor (query/key/value in a
  transformer block) share one batch computation. With a mapping batch holding
  ``attention_mask``, padding positions are dropped from inputs shaped like the mask.
  Runs under ``torch.no_grad()`` with the model in eval mode (no dropout).
* Gradients (``gradient=True``): the allocator's capture hooks
  (:func:`adarank.allocation.capture.install_capture`, dense mode, every token) accumulate
  ``G = Σ δ xᵀ`` (the gradient of the loss w.r.t. the full weight); ``forward_fn`` must return
  the loss. The model stays in eval mode except the adapter layers (their capture needs
  training mode). The hooks are removed afterwards and parameter gradients restored; a
  controller's capture on the same layers records nothing during the pass.

Under DDP (``torch.distributed`` initialised) the statistics of all processes are merged
(:func:`all_reduce_accumulators`; gradients are summed), so each rank sees the global result.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from adarank.allocation.capture import install_capture
from adarank.init.covariance import SecondMomentAccumulator, all_reduce_accumulators
from adarank.init.sketch import NystromSketch
from adarank.modules import SVDLoRALinear, adapter_layers

__all__ = ["CalibrationResult", "calibrate", "default_forward", "loss_of"]

ForwardFn = Callable[[nn.Module, object], object]


@dataclass
class CalibrationResult:
    """What the calibration pass measured.

    Attributes:
        covariances: layer → accumulator (``.estimate(shrinkage)`` gives the spectrum).
        gradients: layer → float64 ``Σ δ xᵀ`` (d_out, d_in) over all calibration tokens.
        num_batches: batches actually used.
        seconds: wall time of the pass.
    """

    covariances: dict[str, SecondMomentAccumulator | NystromSketch] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)
    num_batches: int = 0
    seconds: float = 0.0

    def tokens(self) -> dict[str, int]:
        return {n: a.count for n, a in self.covariances.items()}


def _to_device(batch, device: torch.device):
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def default_forward(model: nn.Module, batch) -> object:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple/list, else ``model(batch)``."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    batch = _to_device(batch, device)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def loss_of(output) -> torch.Tensor:
    """The scalar loss in a model output (a tensor, ``.loss`` or ``["loss"]``).

    Raises:
        TypeError: no scalar loss found (pass a ``forward_fn`` that returns the loss).
    """
    loss = output
    if not torch.is_tensor(loss):
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, Mapping):
            loss = output.get("loss")
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise TypeError(
            f"the gradient calibration needs a scalar loss, got {type(output).__name__}; pass "
            "forward_fn=lambda model, batch: <loss tensor> (or batches with labels for HF models)"
        )
    return loss.reshape(())


class _InputHooks:
    """Forward pre-hooks feeding layer inputs into accumulators (shared per input tensor)."""

    def __init__(self, accs: dict, max_tokens: int | None, seed: int) -> None:
        self.accs = accs
        self.max_tokens = max_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.mask: torch.Tensor | None = None
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor, dict]] = {}

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if self.mask is not None and x.dim() >= 2 and tuple(x.shape[:-1]) == tuple(self.mask.shape):
            flat = x[self.mask.to(x.device)]
        else:
            flat = x.reshape(-1, x.shape[-1])
        if self.max_tokens is not None and flat.shape[0] > self.max_tokens:
            idx = torch.randperm(flat.shape[0], generator=self.generator)[: self.max_tokens]
            flat = flat[idx.to(flat.device)]
        return flat

    def hook(self, name: str):
        def fn(module: nn.Module, args: tuple) -> None:
            if not args or not torch.is_tensor(args[0]):
                return
            x, acc = args[0], self.accs[name]
            entry = self.cache.get(id(x))
            if entry is None or entry[0] is not x:  # keep x alive so id(x) is not reused
                entry = (x, self.rows(x), {})
                self.cache[id(x)] = entry
            per_kind = entry[2]
            key = acc.config_key()
            if key not in per_kind:
                per_kind[key] = acc.spawn().update(entry[1])
            acc.merge(per_kind[key])

        return fn


def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    forward_fn: ForwardFn | None = None,
    num_batches: int = 32,
    layers: Mapping[str, SVDLoRALinear] | None = None,
    covariance: bool = True,
    gradient: bool = False,
    max_tokens_per_batch: int | None = None,
    sketch_threshold: int = 4096,
    sketch_rank: int = 256,
    seed: int = 0,
    mask_key: str | None = "attention_mask",
) -> CalibrationResult:
    """Run up to ``num_batches`` batches and collect per-layer statistics.

    Args:
        model: a model with adapters (ΔW should be 0, so inputs are the base model's).
        batches: iterable of batches (tensors, tuples or mappings).
        forward_fn: ``forward_fn(model, batch)``; its return value is ignored for covariance
            and must be (or contain) the scalar loss for ``gradient=True``.
        num_batches: maximum number of batches used.
        layers: subset of adapter layers (default: all).
        covariance: collect input second moments.
        gradient: accumulate the full-weight gradient ``Σ δ xᵀ``.
        max_tokens_per_batch: random subsample of input rows per batch and layer input
            (bounds the cost of the ``d²`` updates); None keeps all rows.
        sketch_threshold: layers with ``d_in`` above it use a :class:`NystromSketch`.
        sketch_rank: sketch size ℓ.
        seed: seed of the row subsampling and of the sketch's test matrix.
        mask_key: key of the token mask in mapping batches (None: never mask).

    Returns:
        a :class:`CalibrationResult`.
    """
    if int(num_batches) < 1:
        raise ValueError(f"num_batches={num_batches} must be a positive integer")
    if max_tokens_per_batch is not None and int(max_tokens_per_batch) < 1:
        raise ValueError(f"max_tokens_per_batch={max_tokens_per_batch} must be ≥ 1 or None")
    if int(sketch_threshold) < 1 or int(sketch_rank) < 1:
        raise ValueError(
            f"sketch_threshold={sketch_threshold} and sketch_rank={sketch_rank} must be ≥ 1"
        )
    if not (covariance or gradient):
        raise ValueError("calibrate needs covariance=True or gradient=True")
    layers = dict(adapter_layers(model) if layers is None else layers)
    if not layers:
        raise ValueError("model has no adapter layers: call adarank.add_adapters first")
    forward = forward_fn or default_forward
    result = CalibrationResult()
    if covariance:
        for name, layer in layers.items():
            dev = layer.base_weight.device
            if layer.d_in > sketch_threshold:
                rank = min(int(sketch_rank), layer.d_in - 1)
                result.covariances[name] = NystromSketch(layer.d_in, rank, seed, dev)
            else:
                result.covariances[name] = SecondMomentAccumulator(layer.d_in, dev)
    hooks = _InputHooks(result.covariances, max_tokens_per_batch, seed)
    handles = [layers[n].register_forward_pre_hook(hooks.hook(n)) for n in result.covariances]
    modes = {m: m.training for m in model.modules()}
    # dense gradient capture of every token; pauses any controller's capture of these layers
    captures = install_capture(layers, stats=False, max_tokens=None) if gradient else {}
    params = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    start = time.perf_counter()
    try:
        for p in params:  # backward accumulates in place: park the caller's gradients
            p.grad = None
        model.eval()
        for name, cap in captures.items():
            layers[name].train()
            cap.capture_gradient(True)
        for batch in itertools.islice(batches, int(num_batches)):
            mask = batch.get(mask_key) if mask_key and isinstance(batch, Mapping) else None
            hooks.mask = mask.bool() if torch.is_tensor(mask) else None
            if gradient:
                loss_of(forward(model, batch)).backward()
            else:
                with torch.no_grad():
                    forward(model, batch)
            hooks.cache.clear()
            result.num_batches += 1
        if gradient:
            for name, layer in layers.items():
                g = captures[name].captured_grad
                result.gradients[name] = (
                    torch.zeros(layer.d_out, layer.d_in, dtype=torch.float64)
                    if g is None
                    else g.detach().double()
                )
    finally:
        for h in handles:
            h.remove()
        for cap in captures.values():
            cap.remove()
        for m, mode in modes.items():
            m.training = mode
        for p, g in zip(params, saved_grads):
            p.grad = g
    if result.num_batches == 0:
        raise ValueError("calibration got no batches (the iterable was empty)")
    all_reduce_accumulators(result.covariances)
    if gradient and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for name in sorted(result.gradients):
            dist.all_reduce(result.gradients[name])
    result.seconds = time.perf_counter() - start
    return result
