r"""SVD-style LoRA layer with a resizable set of live triplets.

The adapted weight is (AdaLoRA, Zhang et al. 2023, Eq. 1)::

        x ──► W0 (frozen) ───────────────────────────────┐
        │                                                 ▼
        └──► Q (r, d_in) ──► ⊙ λ (r) ──► P (d_out, r) ──► (+) ──► y
                                          × scaling

    y = W0 x + scaling · P · diag(λ) · Q · x

A *triplet* ``(P[:, i], λ_i, Q[i, :])`` costs ``d_in + d_out + 1`` parameters. Tensors are
stored at exactly the **live** rank: pruning and growing replace the parameters with smaller or
larger ones, so memory, forward cost and optimizer state follow the live rank (a rank-0 layer
costs nothing beyond the frozen base). The layer makes no decisions; the allocation engine
(``adarank.allocation``) tells it which slots to prune and which directions to grow.

Init (default): λ = 0 and P, Q with orthonormal columns/rows (a random orthogonal basis),
so the output at init equals the base output exactly and every triplet starts with unit-norm
directions. With Adam, λ then moves at about ``lr`` per step in units of singular value,
which keeps the usable learning-rate band wide (AdaLoRA's std-0.02 init makes the λ-gradients
tiny; docs/theory.md §Scaling).

The layer holds the formula and nothing the allocator measures: ``z = Q·x`` passes through
the identity submodule ``slot_coords``, where :func:`adarank.allocation.capture.install_capture`
(used by the ``RankController`` and by gradient-based inits) hooks Σ (Q x)² per slot, and the
full-weight gradient is captured by hooks on the layer's output. Outside a controller the layer
has no hooks, and a sharding wrapper sees only its parameters and the ``shift_P``/``shift_Q``
buffers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from adarank.modules.base_layers import in_backward_pass, is_conv1d, is_quantized, linear_shape
from adarank.modules.retraction import RETRACT_TIE_RTOL, align_tied_triplets

__all__ = ["SVDLoRALinear", "in_backward_pass", "is_conv1d", "is_quantized", "linear_shape"]


def _orthonormal(rows: int, cols: int, generator: torch.Generator | None) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns (rows ≥ cols) or rows (rows < cols)."""
    g = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique (Haar) orthogonal basis
    # contiguous: QR returns column-major q, and a layout that differs from the one a resized
    # (or checkpoint-restored) layer gets changes matmul rounding, breaking bit-exact resume
    return (q if rows >= cols else q.T).to(torch.float32).contiguous()


class _ScaledUp(torch.autograd.Function):
    """``(z ⊙ c) Pᵀ`` that keeps only ``z`` (plus the small ``c``, ``P``) for backward.

    Plain autograd would save both ``z`` and ``z ⊙ c`` (two rank-sized activations per token);
    LoRA's ``B(Ax)`` saves one. The backward recomputes ``z ⊙ c`` (an elementwise product) so the
    adapter holds what LoRA holds. Gradients, with ``g = ∂L/∂out`` and ``u = g P``:
    ``∂z = u ⊙ c``, ``∂c = Σ_tokens u ⊙ z``, ``∂P = gᵀ (z ⊙ c)``.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, c: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z, c, P)
        return (z * c) @ P.T

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        # in g's dtype (bf16 when the forward ran under autocast), each gradient returned in
        # its input's dtype, as autograd does for an autocast matmul
        z, c, P = ctx.saved_tensors
        u = g @ P.to(g.dtype)  # (..., r)
        grad_z = grad_c = grad_P = None
        if ctx.needs_input_grad[0]:
            grad_z = (u * c.to(g.dtype)).to(z.dtype)
        if ctx.needs_input_grad[1]:
            grad_c = (u * z.to(g.dtype)).reshape(-1, c.shape[0]).sum(0).to(c.dtype)
        if ctx.needs_input_grad[2]:
            zc = (z * c).to(g.dtype).reshape(-1, c.shape[0])
            grad_P = (g.reshape(-1, g.shape[-1]).T @ zc).to(P.dtype)
        return grad_z, grad_c, grad_P


class SVDLoRALinear(nn.Module):
    """Frozen linear layer plus a resizable ``P · diag(λ) · Q`` adapter.

    Args:
        base: ``nn.Linear`` or transformers ``Conv1D`` to wrap; its parameters are frozen.
        rank: initial live rank r (0 allowed).
        scaling: constant factor on ΔW. It never depends on the live rank, so pruning and
            growing are function-preserving.
        max_rank: capacity of the layer (upper bound for growth); default ``min(d_in, d_out)``.
        dropout: dropout probability on the adapter's input.
        adapter_dtype: dtype of P, λ, Q (float32 by default, also for bf16/fp16 bases).
        generator: optional RNG for the orthonormal init.
        factor_init: ``"svd"`` (default, AdaLoRA: λ = 0, orthonormal P and Q) or ``"lora"``
            (P = 0, λ = 1, orthonormal Q: the first steps follow LoRA's B·A dynamics, where the
            output directions P get a gradient at once). Both leave the output unchanged.
    """

    FACTOR_INITS = ("svd", "lora")

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        *,
        scaling: float = 1.0,
        max_rank: int | None = None,
        dropout: float = 0.0,
        adapter_dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        factor_init: str = "svd",
    ) -> None:
        super().__init__()
        if factor_init not in self.FACTOR_INITS:
            raise ValueError(f"factor_init={factor_init!r}: expected one of {self.FACTOR_INITS}")
        self.d_out, self.d_in = linear_shape(base)
        self.transposed = is_conv1d(base)
        full = min(self.d_in, self.d_out)
        max_rank = full if max_rank is None else int(max_rank)
        if not 0 < max_rank <= full:
            raise ValueError(f"max_rank={max_rank} must be in [1, min(d_in, d_out)={full}]")
        if not 0 <= int(rank) <= max_rank:
            raise ValueError(f"rank={rank} must be in [0, max_rank={max_rank}]")
        if not math.isfinite(scaling) or scaling <= 0:
            raise ValueError(f"scaling={scaling} must be a positive finite number")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scaling = float(scaling)
        self.max_rank = max_rank
        self.adapter_dtype = adapter_dtype
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        rank = int(rank)
        dev = self.base_weight.device
        P = _orthonormal(self.d_out, rank, generator)
        lam = torch.zeros(rank)
        Q = _orthonormal(rank, self.d_in, generator)
        if factor_init == "lora":
            P, lam = torch.zeros_like(P), torch.ones(rank)
        self.lora_P = nn.Parameter(P.to(dev, adapter_dtype))
        self.lora_lambda = nn.Parameter(lam.to(dev, adapter_dtype))
        self.lora_Q = nn.Parameter(Q.to(dev, adapter_dtype))
        # low-rank part that an init strategy moved out of W0 (W0 ← W0 − shift); kept so that
        # adapter files can be applied to the original base weights
        self.register_buffer("shift_P", torch.zeros(self.d_out, 0, device=dev), persistent=True)
        self.register_buffer("shift_Q", torch.zeros(0, self.d_in, device=dev), persistent=True)
        # z = Q·x passes through this identity: the allocator's capture hooks it (Σ (Q x)²)
        self.slot_coords = nn.Identity()

    # ------------------------------------------------------------------ properties
    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def rank(self) -> int:
        """Number of live triplets."""
        return self.lora_lambda.shape[0]

    @property
    def triplet_cost(self) -> int:
        """Parameters of one triplet: ``d_in + d_out + 1``."""
        return self.d_in + self.d_out + 1

    @property
    def live_params(self) -> int:
        return self.rank * self.triplet_cost

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, max_rank={self.max_rank}, "
            f"scaling={self.scaling}, merged={self.merged}"
        )

    # ------------------------------------------------------------------ maths
    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · P diag(λ) Q in (d_out, d_in) layout, float32."""
        P = self.lora_P.float()
        return self.scaling * (P * self.lora_lambda.float()) @ self.lora_Q.float()

    @torch.no_grad()
    def delta_singular_values(self) -> torch.Tensor:
        """Exact singular values of ΔW (descending, float64, ``rank`` of them) without forming it.

        λ are ΔW's singular values only while P and Q stay orthonormal; training moves them away
        (no penalty by default), so this uses ``P = Q_P R_P``, ``Qᵀ = Q_Q R_Q`` and the singular
        values of the small core ``s · R_P diag(λ) R_Qᵀ`` (O((d_out + d_in) r²)).
        """
        if self.rank == 0:
            return torch.zeros(0, dtype=torch.float64)
        r_p = torch.linalg.qr(self.lora_P.detach().double(), mode="r")[1]
        r_q = torch.linalg.qr(self.lora_Q.detach().double().T, mode="r")[1]
        core = (r_p * (self.scaling * self.lora_lambda.detach().double())) @ r_q.T
        return torch.linalg.svdvals(core)

    @torch.no_grad()
    def retract_(self, tie_rtol: float = RETRACT_TIE_RTOL) -> None:
        """Make P and Q exactly orthonormal again without changing ΔW, in place.

        ``P = Q_P R_P``, ``Qᵀ = Q_Q R_Q``; the SVD ``R_P diag(λ) R_Qᵀ = U diag(σ) Vᵀ`` gives
        ``P ← Q_P U``, ``λ ← σ``, ``Q ← (Q_Q V)ᵀ``, so λ are then ΔW's singular values / scaling.
        New triplets are matched to the old ones (greedy on ``|⟨p_i, p'_j⟩|·|⟨q_i, q'_j⟩|``) and
        given the old signs, so each slot keeps its triplet and the optimizer state of the slot
        stays meaningful; the Parameter objects are kept (no optimizer update needed).

        Tied singular values (within ``tie_rtol`` of the largest; e.g. every ``|λ| = lr`` after
        Adam's first step, or the ``λ = 0`` of freshly grown triplets) leave the SVD basis of
        their cluster arbitrary, decided by rounding. Inside such a cluster the basis is turned
        (orthogonal Procrustes, :func:`align_tied_triplets`) to the old slots' own directions, so
        the slots keep their triplets and the result does not depend on rounding; ΔW then
        changes by at most the cluster's spread of σ (≤ ``tie_rtol`` · σ_max).
        """
        k = self.rank
        if k == 0:
            return
        P, lam, Q = (t.detach().double() for t in (self.lora_P, self.lora_lambda, self.lora_Q))
        q_p, r_p = torch.linalg.qr(P)
        q_q, r_q = torch.linalg.qr(Q.T)
        core = (r_p * lam) @ r_q.T
        # a diverged step (non-finite factors) is left as it is for the divergence guard to
        # report; the SVD would raise on it, so it runs on zeros and the result is discarded
        finite = torch.isfinite(core).all()
        u, sigma, vh = torch.linalg.svd(torch.where(finite, core, torch.zeros_like(core)))
        # ... as are finite factors whose singular values overflow the parameter dtype
        finite &= torch.isfinite(sigma.to(self.lora_lambda.dtype)).all()
        v = vh.T
        # cosines of the old slots' directions with the new ones, in Q_P / Q_Q coordinates
        # (r_p[:, i] = coordinates of p_i); non-finite norms are caught by the flag above
        unit_p = r_p / r_p.norm(dim=0).clamp_min(1e-300)
        unit_q = r_q / r_q.norm(dim=0).clamp_min(1e-300)
        cos_p, cos_q = unit_p.T @ u, unit_q.T @ v  # (old slot, new triplet)
        # everything the k × k alignment needs, and the finiteness flag, in one transfer: one
        # sync per layer; the alignment runs on the host in float64
        host = torch.cat(
            [cos_p.flatten(), cos_q.flatten(), sigma, torch.sign(lam), finite.to(sigma).view(1)]
        ).cpu()
        if not host[-1]:
            return
        kk = k * k
        turn, lam_new = align_tied_triplets(
            host[:kk].view(k, k),
            host[kk : 2 * kk].view(k, k),
            host[2 * kk : 2 * kk + k],
            host[2 * kk + k : 2 * kk + 2 * k],
            tie_rtol,
        )
        turn_p, turn_q = (t.to(u.device) for t in turn)
        self.lora_P.copy_(q_p @ (u @ turn_p))
        self.lora_Q.copy_((q_q @ (v @ turn_q)).T)
        self.lora_lambda.copy_(lam_new.to(u.device))

    def cap_delta_(self, max_sv: float) -> None:
        """Shrink every triplet whose part of ΔW exceeds ``max_sv`` back to it, in place.

        A triplet's part ``s λ_i p_i q_iᵀ`` has spectral norm ``s |λ_i| ‖p_i‖ ‖q_i‖``; λ_i is
        scaled so that this is at most ``max_sv``. With orthonormal factors (after
        :meth:`retract_`) these are ΔW's singular values, so ``‖ΔW‖₂ ≤ max_sv`` exactly; with
        drifting factors the bound is per triplet only. Directions are kept (a projection of
        λ onto the box, no device sync).
        """
        if not max_sv > 0:
            raise ValueError(f"max_sv={max_sv!r}: expected a positive bound")
        if self.rank == 0:
            return
        with torch.no_grad():
            size = self.scaling * self.lora_lambda.abs()
            size = size * self.lora_P.norm(dim=0) * self.lora_Q.norm(dim=1)
            self.lora_lambda.mul_(torch.clamp(max_sv / size.clamp_min(1e-30), max=1.0))

    def shift_weight(self) -> torch.Tensor:
        """The low-rank part moved out of W0 by a data-aware init, (d_out, d_in)."""
        return self.shift_P.float() @ self.shift_Q.float()

    def _add_to_base(self, delta: torch.Tensor, sign: float) -> None:
        w = self.base_weight
        d = delta.T if self.transposed else delta
        with torch.no_grad():
            w.copy_((w.float() + sign * d.to(w.device)).to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = W0 x + scaling · P diag(λ) Q dropout(x)`` (the base output alone when merged)."""
        out = self.base_layer(x)
        if self.merged or self.rank == 0:
            return out
        h = self.dropout(x).to(self.lora_Q.dtype)  # the live dtype, also after module.to(dtype)
        z = self.slot_coords(h @ self.lora_Q.T)  # (..., r)
        delta = _ScaledUp.apply(z, self.scaling * self.lora_lambda, self.lora_P)  # (..., d_out)
        return out + delta.to(out.dtype)

    # ------------------------------------------------------------------ merge
    def _check_dense_base(self, what: str, instead: str) -> None:
        if is_quantized(self.base_layer):
            raise TypeError(
                f"cannot {what} the quantized base weight of this layer "
                f"({type(self.base_layer).__name__}, d_out={self.d_out}, d_in={self.d_in}): "
                f"it would be rounded back to the quantized format; {instead}"
            )

    def merge(self) -> None:
        """Fold ΔW into the base weight (no-op if already merged).

        Raises:
            TypeError: the base weight is quantized (:func:`is_quantized`).
        """
        if self.merged:
            return
        self._check_dense_base(
            "merge ΔW into",
            "export a merged model instead (adarank export RUN --format merged, or "
            "adarank.export.merge_and_unwrap), which dequantizes the base first",
        )
        if self.rank:
            self._add_to_base(self.delta_weight(), +1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge` (no-op if not merged)."""
        if not self.merged:
            return
        if self.rank:
            self._add_to_base(self.delta_weight(), -1.0)
        self.merged = False

    def _check_resizable(self, what: str) -> None:
        if self.merged:
            raise RuntimeError(
                f"cannot {what} a merged SVDLoRALinear: call unmerge() first (ranks can only "
                "change while ΔW is kept separate from the base weight)"
            )

    def shift_base(self, P0: torch.Tensor, Q0: torch.Tensor) -> None:
        """Move the low-rank matrix ``P0 @ Q0`` out of the base weight: ``W0 ← W0 − P0 Q0``.

        Used by data-aware inits (PiSSA/CorDA-like) so that ``W0 + ΔW_init`` still equals the
        original weight. The shift is recorded and saved with the adapter.
        """
        self._check_resizable("shift the base of")
        self._check_dense_base(
            "shift",
            "use an init that leaves the base alone (adapter.init: lora, activations, gradient)",
        )
        if P0.shape[0] != self.d_out or Q0.shape[1] != self.d_in or P0.shape[1] != Q0.shape[0]:
            raise ValueError(
                f"shift factors must be (d_out={self.d_out}, k) and (k, d_in={self.d_in}), "
                f"got {tuple(P0.shape)} and {tuple(Q0.shape)}"
            )
        dev = self.base_weight.device
        P0, Q0 = P0.detach().float().to(dev), Q0.detach().float().to(dev)
        self._add_to_base(P0 @ Q0, -1.0)
        self.shift_P = torch.cat([self.shift_P, P0], dim=1)
        self.shift_Q = torch.cat([self.shift_Q, Q0], dim=0)

    # ------------------------------------------------------------------ resize
    def _replace(self, P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor) -> None:
        # new Parameter objects (the optimizer must be told, see RankController); keep the
        # trainable/frozen state of the old ones
        trainable = self.lora_lambda.requires_grad
        self.lora_P = nn.Parameter(P.contiguous(), requires_grad=trainable)
        self.lora_lambda = nn.Parameter(lam.contiguous(), requires_grad=trainable)
        self.lora_Q = nn.Parameter(Q.contiguous(), requires_grad=trainable)

    def prune(self, slots: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Remove the given live slots; the remaining ones keep their order.

        Returns:
            LongTensor ``keep`` of the old slot indices that survive (new slot ``i`` was old
            slot ``keep[i]``), for re-indexing optimizer and scorer state.
        """
        self._check_resizable("prune")
        drop = torch.as_tensor(list(slots) if not torch.is_tensor(slots) else slots)
        drop = drop.detach().cpu().long().reshape(-1)
        if drop.numel() and (drop.min() < 0 or drop.max() >= self.rank):
            raise IndexError(f"prune slots {drop.tolist()} out of range for rank {self.rank}")
        mask = torch.ones(self.rank, dtype=torch.bool)
        mask[drop] = False
        keep = torch.nonzero(mask).flatten()
        dev_keep = keep.to(self.lora_lambda.device)
        with torch.no_grad():
            self._replace(
                self.lora_P[:, dev_keep], self.lora_lambda[dev_keep], self.lora_Q[dev_keep]
            )
        return keep

    def grow(
        self,
        p_cols: torch.Tensor,
        q_rows: torch.Tensor,
        lam: torch.Tensor | None = None,
    ) -> range:
        """Append k triplets with directions ``p_cols`` (d_out, k) and ``q_rows`` (k, d_in).

        λ of the new triplets is 0 unless given, so by default the output is unchanged.
        Growth past the initial rank is allowed up to ``max_rank``.

        Returns:
            the range of the new slot indices.
        """
        self._check_resizable("grow")
        if p_cols.dim() != 2 or q_rows.dim() != 2:
            raise ValueError("p_cols must be (d_out, k) and q_rows (k, d_in)")
        k = p_cols.shape[1]
        if p_cols.shape[0] != self.d_out or q_rows.shape != (k, self.d_in):
            raise ValueError(
                f"grow expects p_cols (d_out={self.d_out}, k) and q_rows (k, d_in={self.d_in}), "
                f"got {tuple(p_cols.shape)} and {tuple(q_rows.shape)}"
            )
        if self.rank + k > self.max_rank:
            raise ValueError(
                f"growing {k} triplets would exceed max_rank={self.max_rank} (rank {self.rank})"
            )
        lam = torch.zeros(k) if lam is None else lam.reshape(k)
        like = self.lora_lambda
        with torch.no_grad():
            self._replace(
                torch.cat([self.lora_P, p_cols.to(like)], dim=1),
                torch.cat([self.lora_lambda, lam.to(like)]),
                torch.cat([self.lora_Q, q_rows.to(like)], dim=0),
            )
        return range(self.rank - k, self.rank)

    def set_rank(self, rank: int) -> None:
        """Resize to ``rank`` slots (used when loading files): truncate or pad with λ = 0.

        Raises:
            RuntimeError: if the layer is merged.
            ValueError: if ``rank`` is not in ``[0, max_rank]``.
        """
        self._check_resizable("set the rank of")
        if not 0 <= int(rank) <= self.max_rank:
            raise ValueError(f"rank={rank} must be in [0, max_rank={self.max_rank}]")
        rank = int(rank)
        if rank < self.rank:
            self.prune(range(rank, self.rank))
        elif rank > self.rank:
            k = rank - self.rank
            self.grow(torch.zeros(self.d_out, k), torch.zeros(k, self.d_in))
