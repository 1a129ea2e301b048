r"""Growth candidates from the gradient of ΔW (REFERENCE §2, "a new triplet added with λ = 0").

For a new triplet (u, λ=0, v) the gradient of the loss w.r.t. λ is ``s · uᵀ G v`` where
``G = ∂L/∂W`` (d_out × d_in). The directions that most reduce the loss per unit of λ are the top
singular pairs of G — restricted to what the live triplets cannot already express::

    G⊥ = (I − Π_P) · G · (I − Π_Q)        Π_P, Π_Q: projectors on span(P), span(Qᵀ)

so every candidate is orthogonal to the live P columns and Q rows. The top-k singular triplets of
G⊥ come from a seeded randomized range finder (Halko et al. 2011, Alg. 4.4 with two power
iterations): O(d_out·d_in·k) instead of a full SVD, and bit-identical on every process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Candidates", "growth_candidates", "input_energy", "randomized_svd"]


@dataclass
class Candidates:
    """Top-k growth directions of one layer."""

    p_cols: torch.Tensor  # (d_out, k) unit columns, ⟂ span(P)
    q_rows: torch.Tensor  # (k, d_in) unit rows, ⟂ span(Qᵀ)
    sigma: torch.Tensor  # (k,) uᵀ G v ≥ 0
    energy_in: torch.Tensor  # (k,) vᵀ C v (mean input energy along v)

    @property
    def k(self) -> int:
        return int(self.sigma.numel())


def _orth_basis(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (columns) of span(m's columns), rank-revealing."""
    if m.shape[1] == 0:
        return m
    q, r = torch.linalg.qr(m)
    keep = torch.diagonal(r).abs() > 1e-10 * max(1.0, float(torch.diagonal(r).abs().max()))
    return q[:, keep]


def randomized_svd(
    a: torch.Tensor, k: int, *, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD ``a ≈ U diag(S) Vᵀ`` with a dedicated, seeded generator (no global RNG use)."""
    m, n = a.shape
    k = min(k, m, n)
    if min(m, n) <= 2 * (k + oversample):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :k], s[:k], vh[:k].T
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, k + oversample, generator=g, dtype=a.dtype).to(a.device)
    y = a @ omega
    for _ in range(power_iters):
        y = a @ (a.T @ torch.linalg.qr(y).Q)
    qy = torch.linalg.qr(y).Q
    u_small, s, vh = torch.linalg.svd(qy.T @ a, full_matrices=False)
    return (qy @ u_small)[:, :k], s[:k], vh[:k].T


def input_energy(
    q_rows: torch.Tensor,
    *,
    input_samples: torch.Tensor | None = None,
    input_moment: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean input energy ``c = E[(vᵀx)²]`` along each row v of ``q_rows`` (k, d_in).

    From sampled input rows (n, d_in), from a second-moment matrix C (d_in, d_in) or its
    diagonal (d_in,); ones if neither is given.
    """
    v = q_rows.double().T  # (d_in, k)
    if input_samples is not None and input_samples.shape[0]:
        return ((input_samples.double().to(v.device) @ v) ** 2).mean(0)
    if input_moment is not None:
        c = input_moment.double().to(v.device)
        return (v * (c @ v)).sum(0) if c.dim() == 2 else (v**2 * c.unsqueeze(1)).sum(0)
    return torch.ones(v.shape[1], dtype=torch.float64, device=v.device)


def growth_candidates(
    grad: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor,
    k: int,
    *,
    input_samples: torch.Tensor | None = None,
    input_moment: torch.Tensor | None = None,
    seed: int = 0,
) -> Candidates:
    """Top-k directions of the projected gradient of one layer.

    Args:
        grad: G = ∂L/∂W, (d_out, d_in), in (out, in) layout.
        P: live left factors (d_out, r); Q: live right factors (r, d_in).
        k: number of candidates wanted.
        input_samples: sampled layer inputs (n, d_in) for the candidates' input energy ``vᵀCv``;
            or ``input_moment``: C (d_in, d_in) or its diagonal (see :func:`input_energy`).
        seed: seed of the randomized SVD.
    """
    g = grad.double()
    d_out, d_in = g.shape
    if k <= 0:
        return Candidates(
            g.new_zeros(d_out, 0), g.new_zeros(0, d_in), g.new_zeros(0), g.new_zeros(0)
        )
    up = _orth_basis(P.detach().double().to(g.device))
    vq = _orth_basis(Q.detach().double().T.to(g.device))
    if up.shape[1]:
        g = g - up @ (up.T @ g)
    if vq.shape[1]:
        g = g - (g @ vq) @ vq.T
    u, s, v = randomized_svd(g, k, seed=seed)
    # re-project (round-off) and normalise so candidates are exactly ⟂ the live subspaces
    if up.shape[1]:
        u = u - up @ (up.T @ u)
    if vq.shape[1]:
        v = v - vq @ (vq.T @ v)
    u = u / u.norm(dim=0).clamp_min(1e-30)
    v = v / v.norm(dim=0).clamp_min(1e-30)
    energy = input_energy(v.T, input_samples=input_samples, input_moment=input_moment)
    keep = s > 1e-12 * max(1.0, float(s.max()) if s.numel() else 1.0)
    return Candidates(u[:, keep], v[:, keep].T, s[keep], energy[keep])
