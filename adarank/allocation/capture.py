r"""What the rank allocator measures during training, recorded by hooks on the adapter layers.

:class:`~adarank.modules.svd_lora.SVDLoRALinear` computes ``y = W0 x + s·P·diag(λ)·(Q x)`` and
keeps nothing else; :func:`install_capture` hooks a set of layers and records, per layer
(:class:`LayerCapture`):

* ``z_sq_sum`` — Σ over training tokens of ``(Q x)²`` per live slot (the input energy along each
  triplet's right direction, for the energy score) and ``z_count`` (tokens), read from the
  layer's ``slot_coords`` identity (``z = Q·x`` after the adapter's dropout) by a forward hook;
* gradient capture (:meth:`LayerCapture.capture_gradient`) — a forward hook on the layer puts a
  tensor hook on its output; in backward that hook receives δ = ∂L/∂y and accumulates
  ``G = Σ δ xᵀ`` (the gradient of the loss w.r.t. the full weight, d_out × d_in) or only its
  single-pass sketches ``(G Ω', Ψ' G)``, and keeps a few input rows. At most ``max_tokens``
  evenly strided tokens of each forward enter G (rescaled, so G stays an unbiased estimate of
  the full-batch gradient); the layer forward hook exists only while a capture is armed.

Activation checkpointing re-runs a block's forward inside backward; such a recomputation
(:func:`~adarank.modules.base_layers.in_backward_pass`) adds no statistics, so a step's
statistics and captured gradient are the same with and without checkpointing. Non-reentrant
checkpointing (``build_hf_model``'s): the first forward records and captures, the
recomputation only rebuilds the same graph. Reentrant (first forward under ``no_grad``):
statistics come from the first forward, the capture (which needs a graph) from the
recomputation.

Only the most recently installed capture of a layer records (a calibration pass on top of a
controller's capture pauses it; a new controller takes the layers over from an old one); removing
it hands recording back to the previous one. Hooks act only on the module they were installed
on, so a deep copy of a hooked model records nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import nn

from adarank.modules.base_layers import in_backward_pass

__all__ = [
    "CAPTURE_MAX_TOKENS",
    "CaptureSet",
    "LayerCapture",
    "install_capture",
    "installed",
    "sample_signs",
]

#: default cap on the tokens of one forward that enter the captured gradient (None: all)
CAPTURE_MAX_TOKENS = 1024

# layer -> its installed captures, oldest first; only the last one records
_STACKS: weakref.WeakKeyDictionary[nn.Module, list[LayerCapture]] = weakref.WeakKeyDictionary()


def installed(layer: nn.Module) -> list[LayerCapture]:
    """The captures installed on ``layer``, oldest first (the last one records)."""
    return list(_STACKS.get(layer, ()))


class LayerCapture:
    """Hooks on one adapter layer and what they recorded (see the module docstring).

    Args:
        layer: the :class:`~adarank.modules.svd_lora.SVDLoRALinear` to hook.
        stats: record ``z_sq_sum`` / ``z_count`` (a calibration pass records only gradients).
        max_tokens: cap on the tokens of one forward entering the captured gradient (None: all).
    """

    def __init__(
        self, layer: nn.Module, *, stats: bool = True, max_tokens: int | None = CAPTURE_MAX_TOKENS
    ) -> None:
        if max_tokens is not None and (isinstance(max_tokens, bool) or int(max_tokens) < 1):
            raise ValueError(f"max_tokens={max_tokens!r}: expected a positive int or None")
        self.d_in, self.d_out = layer.d_in, layer.d_out
        self.stats = bool(stats)
        self.max_tokens = max_tokens
        self._layer = weakref.ref(layer)
        self._tap = weakref.ref(layer.slot_coords)
        self._handles = []
        self._grad_handle = None
        self.active = False
        self._reset_stats()
        self._capture = False
        self._reset_capture()
        stack = _STACKS.setdefault(layer, [])
        if stack:
            stack[-1].active = False
        stack.append(self)
        self.active = True
        if self.stats:
            self._handles.append(layer.slot_coords.register_forward_hook(self._on_coords))

    # ------------------------------------------------------------------ life cycle
    @property
    def layer(self) -> nn.Module | None:
        """The hooked layer (None once it was garbage-collected or this capture was copied)."""
        return self._layer() if self._layer is not None else None

    @property
    def removed(self) -> bool:
        return self._layer is None

    def remove(self) -> None:
        """Remove the hooks; the previous capture of the layer (if any) records again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._unhook_output()
        layer = self.layer
        stack = _STACKS.get(layer) if layer is not None else None
        if stack and self in stack:
            top = stack[-1] is self
            stack.remove(self)
            if top and stack:
                stack[-1].active = True
            if not stack:
                del _STACKS[layer]
        self.active = False
        self._layer = self._tap = None

    def __getstate__(self) -> dict:
        # a copied or pickled capture is detached: it holds no layer and records nothing
        state = {k: v for k, v in self.__dict__.items() if k not in ("_handles", "_grad_handle")}
        state.update(_layer=None, _tap=None, active=False, _handles=[], _grad_handle=None)
        return state

    # ------------------------------------------------------------------ statistics
    def _reset_stats(self, rank: int | None = None) -> None:
        layer = self.layer
        dev = layer.lora_lambda.device if layer is not None else None
        n = (layer.rank if layer is not None else 0) if rank is None else rank
        self.z_sq_sum = torch.zeros(n, device=dev)
        self.z_count = 0

    def pop_stats(self) -> tuple[torch.Tensor, int]:
        """Return and reset ``(Σ (Q x)², token count)`` accumulated since the last call.

        A layer resized by someone other than the controller (which calls :meth:`remap`)
        since the last forward restarts its statistics: the old sums cannot be mapped to slots.
        """
        layer = self.layer
        if layer is not None and self.z_sq_sum.numel() != layer.rank:
            self._reset_stats()
        out = (self.z_sq_sum, self.z_count)  # handed over, not copied: a fresh sum starts
        self._reset_stats()
        return out

    def remap(self, keep: torch.Tensor, n_new: int) -> None:
        """Follow a resize: slot ``i`` of the sums was old slot ``keep[i]``, then ``n_new`` zeros."""
        z = self.z_sq_sum[keep.to(self.z_sq_sum.device)]
        self.z_sq_sum = torch.cat([z, z.new_zeros(int(n_new))])

    def _on_coords(self, tap: nn.Module, args, z: torch.Tensor) -> None:
        layer = self.layer
        if not self.active or tap is not self._tap() or not layer.training or in_backward_pass():
            return
        r = z.shape[-1]
        with torch.no_grad():
            if self.z_sq_sum.numel() != r:  # resized without remap: restart the statistics
                self._reset_stats(r)
            if self.z_sq_sum.device != z.device:
                self.z_sq_sum = self.z_sq_sum.to(z.device)
            self.z_sq_sum += z.detach().float().pow(2).reshape(-1, r).sum(0)
            self.z_count += z.numel() // r

    # ------------------------------------------------------------------ gradient capture
    @property
    def capturing(self) -> bool:
        """True while a gradient capture is armed."""
        return self._capture

    def capture_gradient(
        self,
        enabled: bool,
        sketch: tuple[torch.Tensor, torch.Tensor] | None = None,
        noise: bool = False,
    ) -> None:
        """Start/stop capturing the full-weight gradient ``G = Σ δ xᵀ`` and sampled inputs.

        Args:
            enabled: start (True) or stop and clear (False).
            sketch: optional test matrices ``(omega (d_in, l), psi (l, d_out))``. Then only the
                single-pass sketches ``Y = G·omega`` (d_out, l) and ``W = psi·G`` (l, d_in) are
                accumulated (``captured_sketch``) instead of the d_out × d_in matrix: the cost
                per token is O((d_in + d_out)·l) instead of O(d_in·d_out) (Tropp et al. 2017).
            noise: with ``sketch``, also accumulate the same sketches of the sign-flipped
                gradient ``Σ ε δ xᵀ`` (``captured_noise_sketch``, see :func:`sample_signs`).
        """
        if enabled and self.removed:
            raise RuntimeError("this capture was removed; install a new one")
        self._capture = bool(enabled)
        self._reset_capture()
        if enabled and sketch is not None:
            omega, psi = sketch
            if omega.shape[0] != self.d_in or psi.shape[1] != self.d_out:
                raise ValueError(
                    f"sketch test matrices must be (d_in={self.d_in}, l) and (l, d_out="
                    f"{self.d_out}), got {tuple(omega.shape)} and {tuple(psi.shape)}"
                )
            dev = self.layer.base_weight.device
            self.sketch = (omega.float().to(dev), psi.float().to(dev))
            self._noise = bool(noise)
        if self._capture and self._grad_handle is None:
            self._grad_handle = self.layer.register_forward_hook(self._on_output, with_kwargs=True)
        elif not self._capture:
            self._unhook_output()

    def _unhook_output(self) -> None:
        if self._grad_handle is not None:
            self._grad_handle.remove()
            self._grad_handle = None

    def _reset_capture(self) -> None:
        self.captured_grad: torch.Tensor | None = None  # (d_out, d_in) ≈ Σ δ xᵀ over all tokens
        self.captured_x: list[torch.Tensor] = []  # sampled input rows, each (n_i, d_in)
        self.captured_tokens = 0  # tokens seen (before subsampling)
        self.captured_sketch: tuple[torch.Tensor, torch.Tensor] | None = None  # (Y, W)
        # (Y, W) of the sign-flipped gradient Σ ε δ xᵀ (see sample_signs): the noise reference
        self.captured_noise_sketch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sketch: tuple[torch.Tensor, torch.Tensor] | None = None  # test matrices (Ω', Ψ')
        self._noise = False  # whether the sketch capture also keeps captured_noise_sketch
        self._deferred_captures = 0  # no-grad forwards whose capture waits for a recomputation

    def captured_inputs(self) -> torch.Tensor:
        """The sampled input rows of the capture, (n, d_in) float32."""
        if not self.captured_x:
            return torch.zeros(0, self.d_in)
        return torch.cat(self.captured_x)

    def memory_bytes(self) -> int:
        """Bytes held by the captured gradient, sketches and input rows."""
        parts = [
            self.captured_grad,
            *self.captured_x,
            *(self.captured_sketch or ()),
            *(self.captured_noise_sketch or ()),
        ]
        return sum(t.nbytes for t in parts if t is not None)

    def _on_output(self, layer: nn.Module, args, kwargs, out: torch.Tensor):
        """Capture once per token whether or not (and however) the block is checkpointed.

        A training-mode forward under ``no_grad`` that is never recomputed (not checkpointing)
        leaves a deferred capture until the next ``capture_gradient`` call resets it.
        """
        if not self.active or layer is not self.layer or not layer.training:
            return None
        x = args[0] if args else kwargs["x"]
        if not in_backward_pass():
            if torch.is_grad_enabled():
                return self._attach(x, out)
            self._deferred_captures += 1  # reentrant checkpointing: capture when recomputed
            return None
        if self._deferred_captures > 0:  # reentrant recomputation: its own graph is backpropagated
            self._deferred_captures -= 1
            return self._attach(x, out)
        # non-reentrant recomputation: the first forward captured already; only rebuild the same
        # graph (saved tensors must match the first forward's)
        if torch.is_grad_enabled() and not out.requires_grad:
            return out.detach().requires_grad_(True)
        return None

    def _attach(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        xs = x.detach().reshape(-1, self.d_in).float()
        n = xs.shape[0]
        cap = self.max_tokens
        idx = None
        if cap is not None and n > cap:
            idx = torch.arange(0, n, -(-n // cap), device=xs.device)  # evenly strided tokens
            xs = xs[idx]
        scale = n / xs.shape[0]
        signs = sample_signs(x, idx) if self.sketch is not None and self._noise else None
        with torch.no_grad():
            self.captured_x.append(xs)
            self.captured_tokens += n
        if not out.requires_grad:  # e.g. first layer of a frozen model with rank 0
            out = out.detach().requires_grad_(True)
        d_out = self.d_out

        def hook(grad: torch.Tensor) -> None:
            g2 = grad.detach().reshape(-1, d_out)
            if idx is not None:
                g2 = g2[idx]
            g2 = g2.float() * scale if scale != 1.0 else g2.float()
            if self.sketch is not None:
                omega, psi = self.sketch
                xo, gp = xs @ omega, g2 @ psi.T
                y = g2.T @ xo  # (d_out, l) = G·omega
                w = gp.T @ xs  # (l, d_in) = psi·G
                if self.captured_sketch is not None:
                    y, w = y + self.captured_sketch[0], w + self.captured_sketch[1]
                self.captured_sketch = (y, w)
                if signs is not None:
                    # the same sketches of Σ ε δ xᵀ, ε = ±1 alternating per sample: the mean
                    # gradient cancels, the sampling noise stays (growth's noise floor, growth.py)
                    yn, wn = (g2 * signs).T @ xo, (gp * signs).T @ xs
                    if self.captured_noise_sketch is not None:
                        yn = yn + self.captured_noise_sketch[0]
                        wn = wn + self.captured_noise_sketch[1]
                    self.captured_noise_sketch = (yn, wn)
                return
            g = g2.T @ xs  # (d_out, d_in)
            self.captured_grad = g if self.captured_grad is None else self.captured_grad + g

        out.register_hook(hook)
        return out


def sample_signs(x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """``(n, 1)`` float signs ε = +1, −1, +1, … alternating per **sample** of ``x``'s tokens.

    A sample is an index of ``x``'s first dimension when ``x`` has three or more dimensions
    (batch, sequence, features), else a row. ``Σ ε_t δ_t x_tᵀ`` has mean zero (the samples'
    common mean gradient cancels) and, for independent samples, the same covariance as the
    gradient's sampling noise. Alternating by position keeps the signs the same whether a batch
    is processed at once or as contiguous micro-batches of an even number of samples (not across
    DDP processes, whose sampler interleaves the samples).
    ``idx``: the subsampled token positions (the capture's ``max_tokens`` striding).
    """
    n = x.numel() // x.shape[-1]
    per_sample = n // x.shape[0] if x.dim() >= 3 and x.shape[0] else 1
    pos = torch.arange(n, device=x.device) if idx is None else idx
    return (1.0 - 2.0 * ((pos // per_sample) % 2).float()).unsqueeze(1)


class CaptureSet(dict):
    """``{name: LayerCapture}`` from :func:`install_capture`; ``remove()`` takes every hook off
    (also on leaving a ``with`` block)."""

    def remove(self) -> None:
        for cap in self.values():
            cap.remove()

    def __enter__(self) -> CaptureSet:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def install_capture(
    layers: Mapping[str, nn.Module],
    *,
    stats: bool = True,
    max_tokens: int | None = CAPTURE_MAX_TOKENS,
) -> CaptureSet:
    """Hook every layer of ``layers`` (``{name: SVDLoRALinear}``) and return the captures.

    Used by :class:`~adarank.allocation.controller.RankController` (removed by its ``close()``)
    and by the gradient calibration of data-aware inits (``stats=False, max_tokens=None``).
    """
    out = CaptureSet()
    for name, layer in layers.items():
        if not hasattr(layer, "slot_coords"):
            raise TypeError(
                f"layer {name!r}: expected an SVDLoRALinear, got {type(layer).__name__}"
            )
        out[name] = LayerCapture(layer, stats=stats, max_tokens=max_tokens)
    return out
