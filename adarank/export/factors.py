r"""Low-rank factors shared by every export path.

An adarank layer stores ``ΔW = s · P diag(λ) Q`` (AdaLoRA Eq. 1, scaling ``s``) and, after a
data-aware init (PiSSA/CorDA-like, docs/theory.md §Data-informed initialisation), a shift ``S = shift_P · shift_Q`` that was moved
out of the frozen base. Relative to the **original** base weight ``W0`` the layer computes::

    W0 − S + ΔW  =  W0 + [P | shift_P] · diag([s·λ, −1, …, −1]) · [Q ; shift_Q]

so the total update is one low-rank product of rank ``r + k`` (k = shift rank). The PEFT export
and the multi-adapter server use exactly this form (:func:`total_update_factors`).

Going the other way, a LoRA update ``c · B A`` (Hu et al. 2021, §4.1, ``c = α/r``) is re-factored
exactly into SVD form by :func:`refactor_lora`: with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (thin QR)
and the SVD of the small core ``c · R_B R_Aᵀ = U Σ Vᵀ``::

    c · B A = (Q_B U) · Σ · (Q_A V)ᵀ  →  P = Q_B U,  λ = Σ,  Q = Vᵀ Q_Aᵀ

P and Q come out orthonormal and λ sorted in decreasing order, which is the state the adaptive
allocator expects (it scores and prunes triplets individually).
"""

from __future__ import annotations

import torch

from adarank.modules.svd_lora import SVDLoRALinear

__all__ = ["total_update_factors", "refactor_lora"]


def total_update_factors(
    layer: SVDLoRALinear,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors of the layer's update relative to the original (unshifted) base weight.

    Args:
        layer: an adarank adapter layer (merged or not; the factors do not change).

    Returns:
        ``(P, lam, Q)`` in float32 with shapes ``(d_out, k)``, ``(k,)``, ``(k, d_in)`` and
        ``P diag(lam) Q = scaling · P diag(λ) Q − shift_P shift_Q`` (k = rank + shift rank).
        The adapter scaling is folded into ``lam``.
    """
    P = layer.lora_P.detach().float()
    lam = layer.lora_lambda.detach().float() * layer.scaling
    Q = layer.lora_Q.detach().float()
    k = layer.shift_P.shape[1]
    if k:
        P = torch.cat([P, layer.shift_P.detach().float().to(P.device)], dim=1)
        lam = torch.cat([lam, torch.full((k,), -1.0, device=lam.device)])
        Q = torch.cat([Q, layer.shift_Q.detach().float().to(Q.device)], dim=0)
    return P, lam, Q


def refactor_lora(
    B: torch.Tensor, A: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact SVD-form factors of ``scale · B A`` (module docstring).

    Args:
        B: LoRA ``B`` (d_out, r).
        A: LoRA ``A`` (r, d_in).
        scale: the LoRA scaling (``α / r``, or ``α / √r`` with rsLoRA).

    Returns:
        ``(P, lam, Q)`` float32 with ``P`` (d_out, k) orthonormal columns, ``lam`` (k,) ≥ 0 in
        decreasing order, ``Q`` (k, d_in) orthonormal rows, ``k = min(r, d_out, d_in)`` and
        ``P diag(lam) Q = scale · B A`` up to float rounding (computed in float64).

    Raises:
        ValueError: if the shapes do not chain (``B.shape[1] != A.shape[0]``).
    """
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"LoRA factors must be B (d_out, r) and A (r, d_in), got B {tuple(B.shape)} and "
            f"A {tuple(A.shape)}"
        )
    Qb, Rb = torch.linalg.qr(B.detach().double())  # (d_out, kb), (kb, r)
    Qa, Ra = torch.linalg.qr(A.detach().double().T)  # (d_in, ka), (ka, r)
    core = float(scale) * Rb @ Ra.T  # (kb, ka)
    U, S, Vh = torch.linalg.svd(core, full_matrices=False)
    P = Qb @ U  # (d_out, k)
    Q = Vh @ Qa.T  # (k, d_in)
    return P.float(), S.float(), Q.float()
