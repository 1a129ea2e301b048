"""Handing the triplets of a fresh SVD back to their slots (the host-side half of
:meth:`adarank.modules.svd_lora.SVDLoRALinear.retract_`; docs/theory.md, "Tied singular values").
"""

from __future__ import annotations

import torch

__all__ = ["RETRACT_TIE_RTOL", "align_tied_triplets"]


#: singular values of one layer closer than this (relative to its largest) count as tied in
#: :meth:`SVDLoRALinear.retract_`: their SVD basis is chosen by rounding, so it is aligned to
#: the old slots instead
RETRACT_TIE_RTOL = 1e-5


def align_tied_triplets(
    cos_p: torch.Tensor,
    cos_q: torch.Tensor,
    sigma: torch.Tensor,
    lam_sign: torch.Tensor,
    tie_rtol: float = RETRACT_TIE_RTOL,
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Hand the triplets of a fresh SVD back to the slots they came from (host-side, k × k).

    Args:
        cos_p, cos_q: ``cos_p[i, j]`` = cosine of old slot i's ``p`` (``q``) with the new
            triplet j's (k × k).
        sigma: the new singular values, descending (k).
        lam_sign: the signs of the old λ (k; 0 counts as +).
        tie_rtol: σ within ``tie_rtol · σ_max`` of each other form one tied cluster.

    Returns:
        ``(turn_p, turn_q), lam``: slot i's new directions are ``U @ turn_p[:, i]`` and
        ``V @ turn_q[:, i]`` (U, V the SVD's) and its value ``lam[i]``, signed so that both
        directions point the way the old ones did.

    A tied cluster C has no preferred basis: any rotation R applied to both ``U_C`` and ``V_C``
    keeps ``U_C diag(σ_C) V_Cᵀ`` (exactly when the σ are equal). R is the orthogonal
    Procrustes solution that turns the cluster onto the |C| old slots with most energy in it:
    with ``M = (cos_p + sign(λ)·cos_q)[S, C]`` = X Σ Yᵀ, R = Y Xᵀ maximises tr(M R). A cluster
    at σ ≈ 0 leaves ``U_C`` and ``V_C`` free independently, so each gets its own Procrustes
    rotation and its values are set to exactly 0. Another cluster's values become
    ``diag(Rᵀ diag(σ_C) R)``. Then every slot takes the triplet its directions overlap most
    (greedy on ``|cos_p|·|cos_q|``) and the old signs.
    """
    k = sigma.numel()
    cos_p, cos_q, sigma = cos_p.double(), cos_q.double(), sigma.double()
    sign = torch.where(lam_sign < 0, -1.0, 1.0).to(cos_p)
    rot_p, rot_q = torch.eye(k, dtype=torch.float64), torch.eye(k, dtype=torch.float64)
    value = sigma.clone()
    gap = sigma[:-1] - sigma[1:]
    cuts = [0, *(int(j) + 1 for j in torch.nonzero(gap > tie_rtol * sigma[0]).flatten()), k]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        if hi - lo < 2:
            continue
        c = slice(lo, hi)
        if sigma[lo] <= tie_rtol * sigma[0]:
            # a cluster at σ ≈ 0: U_C and V_C are each arbitrary on their own
            energy = cos_p[:, c].square().sum(1) + cos_q[:, c].square().sum(1)
            slots = torch.topk(energy, hi - lo).indices.sort().values
            rot_p[c, c], rot_q[c, c] = _procrustes(cos_p[slots, c]), _procrustes(cos_q[slots, c])
            value[c] = 0.0  # rounding noise: zero stays exactly zero (a grown triplet's λ)
            continue
        pull = cos_p[:, c] + sign[:, None] * cos_q[:, c]  # (old slot, cluster member)
        slots = torch.topk(pull.norm(dim=1), hi - lo).indices.sort().values
        rot_p[c, c] = rot_q[c, c] = _procrustes(pull[slots])
        value[c] = torch.diagonal(rot_p[c, c].T @ torch.diag(sigma[c]) @ rot_p[c, c])
    cos_p, cos_q = cos_p @ rot_p, cos_q @ rot_q
    score = cos_p.abs() * cos_q.abs()
    order = torch.empty(k, dtype=torch.long)
    for _ in range(k):
        i, j = divmod(int(torch.argmax(score)), k)
        order[i] = j
        score[i, :] = -1.0
        score[:, j] = -1.0
    slot = torch.arange(k)
    sign_p = torch.where(cos_p[slot, order] < 0, -1.0, 1.0).to(cos_p)
    sign_q = torch.where(cos_q[slot, order] < 0, -1.0, 1.0).to(cos_q)
    return (rot_p[:, order] * sign_p, rot_q[:, order] * sign_q), value[order] * sign_p * sign_q


def _procrustes(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal R maximising tr(m R): with m = X Σ Yᵀ, R = Y Xᵀ."""
    x, _, yh = torch.linalg.svd(m)
    return yh.T @ x.T
