r"""Growth candidates from the gradient of ΔW: new triplets added with λ = 0 (docs/theory.md §Growth).

For a new triplet (u, λ=0, v) the gradient of the loss w.r.t. λ is ``s · uᵀ G v`` where
``G = ∂L/∂W`` (d_out × d_in). The directions that most reduce the loss per unit of λ are the top
singular pairs of G — restricted to what the live triplets cannot already express::

    G⊥ = (I − Π_P) · G · (I − Π_Q)        Π_P, Π_Q: projectors on span(P), span(Qᵀ)

so every candidate is orthogonal to the live P columns and Q rows. The top-k singular triplets of
G⊥ come from a seeded randomized range finder (Halko et al. 2011, Alg. 4.4 with two power
iterations): O(d_out·d_in·k) instead of a full SVD, and bit-identical on every process.

During training the controller does not form G at all: the layers accumulate the single-pass
sketches ``Y = G Ω'`` and ``W = Ψ' G`` (Tropp, Yurtsever, Udell & Cevher 2017, "Practical
sketching algorithms for low-rank matrix approximation", §4) with test matrices already projected
off the live subspaces, ``Ω' = (I − Π_Q) Ω`` and ``Ψ' = Ψ (I − Π_P)``, so that ``(I − Π_P) Y`` and
``W (I − Π_Q)`` are exact sketches of G⊥. The reconstruction ``G⊥ ≈ Q_Y (Ψ' Q_Y)⁺ W`` gives the
candidates at O((d_in + d_out)·l) cost per token instead of O(d_in·d_out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Candidates",
    "growth_candidates",
    "input_energy",
    "randomized_svd",
    "sketch_test_matrices",
    "candidates_from_sketch",
]


@dataclass
class Candidates:
    """Top-k growth directions of one layer."""

    p_cols: torch.Tensor  # (d_out, k) unit columns, ⟂ span(P)
    q_rows: torch.Tensor  # (k, d_in) unit rows, ⟂ span(Qᵀ)
    sigma: torch.Tensor  # (k,) uᵀ G v ≥ 0
    energy_in: torch.Tensor  # (k,) vᵀ C v (mean input energy along v)
    noise: float = 0.0  # ν: top singular value of the sampling noise of G⊥ (0: not measured)

    @property
    def k(self) -> int:
        return int(self.sigma.numel())

    @property
    def signal(self) -> torch.Tensor:
        """``sqrt(max(σ² − ν², 0))``: what of σ stands above the noise floor ν."""
        return (self.sigma.double() ** 2 - float(self.noise) ** 2).clamp_min(0).sqrt()

    def keep(self, mask: torch.Tensor) -> Candidates:
        """The candidates where ``mask`` is true (same noise floor)."""
        return Candidates(
            self.p_cols[:, mask],
            self.q_rows[mask],
            self.sigma[mask],
            self.energy_in[mask],
            self.noise,
        )


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
    g = _project_off(_project_off(g, up, "left"), vq, "right")
    u, s, v = randomized_svd(g, k, seed=seed)
    cand = _finish(u, s, v, up, vq)
    cand.energy_in = input_energy(
        cand.q_rows, input_samples=input_samples, input_moment=input_moment
    )
    return cand


def _finish(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, up: torch.Tensor, vq: torch.Tensor
) -> Candidates:
    """Re-project (round-off) and normalise so candidates are exactly ⟂ the live subspaces;
    drop directions with no gradient. ``energy_in`` is left at ones for the caller to fill."""
    u = _project_off(u, up, "left")
    v = _project_off(v, vq, "left")
    u = u / u.norm(dim=0).clamp_min(1e-30)
    v = v / v.norm(dim=0).clamp_min(1e-30)
    keep = s > 1e-12 * max(1.0, float(s.max()) if s.numel() else 1.0)
    n = int(keep.sum())
    return Candidates(u[:, keep], v[:, keep].T, s[keep], torch.ones(n, dtype=torch.float64))


def _project_off(m: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    if basis.shape[1] == 0:
        return m
    if side == "left":  # (I − B Bᵀ) m
        return m - basis @ (basis.T @ m)
    return m - (m @ basis) @ basis.T  # m (I − B Bᵀ)


def sketch_test_matrices(
    P: torch.Tensor, Q: torch.Tensor, k: int, *, oversample: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded test matrices ``(Ω' (d_in, k+p), Ψ' (2(k+p)+1, d_out))`` projected off span(Qᵀ), span(P)."""
    d_out, d_in = P.shape[0], Q.shape[1]
    r1 = min(k + oversample, d_in, d_out)
    r2 = min(2 * r1 + 1, d_out)
    g = torch.Generator(device="cpu").manual_seed(seed)
    # drawn in float32 (CPU float64 normals cost ~6× more, and the draw dominated arming the
    # capture); the projections below run in float64
    omega = torch.randn(d_in, r1, generator=g).double()
    psi = torch.randn(r2, d_out, generator=g).double()
    up = _orth_basis(P.detach().double().cpu())
    vq = _orth_basis(Q.detach().double().cpu().T)
    return _project_off(omega, vq, "left").float(), _project_off(psi, up, "right").float()


def candidates_from_sketch(
    y: torch.Tensor,
    w: torch.Tensor,
    psi: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor,
    k: int,
    noise_sketch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Candidates:
    """Top-k directions of G⊥ from the sketches ``Y = G Ω'`` (d_out, l1), ``W = Ψ' G`` (l2, d_in).

    Args:
        y, w: accumulated sketches (see :func:`sketch_test_matrices`).
        psi: the co-range test matrix Ψ' used for ``w``.
        P, Q: the live factors now (candidates are re-projected off them and normalised).
        k: candidates wanted.
        noise_sketch: the same sketches of the sign-flipped gradient ``Σ ε δ xᵀ``
            (:func:`~adarank.allocation.capture.sample_signs`); its top singular value, through
            the same reconstruction, is the candidates' noise floor ``noise`` (module docstring).
    """
    y, w, psi = y.double().cpu(), w.double().cpu(), psi.double().cpu()
    d_out, d_in = y.shape[0], w.shape[1]
    empty = Candidates(y.new_zeros(d_out, 0), y.new_zeros(0, d_in), y.new_zeros(0), y.new_zeros(0))
    up = _orth_basis(P.detach().double().cpu())
    vq = _orth_basis(Q.detach().double().cpu().T)
    if k <= 0:
        return empty
    rec = _reconstruct(y, w, psi, up, vq)
    if rec is None:
        return empty
    qy, core = rec
    u_s, s, vh = torch.linalg.svd(core, full_matrices=False)
    k = min(k, int(s.numel()))
    cand = _finish(qy @ u_s[:, :k], s[:k], vh[:k].T, up, vq)
    if noise_sketch is not None:
        rec = _reconstruct(
            noise_sketch[0].double().cpu(), noise_sketch[1].double().cpu(), psi, up, vq
        )
        cand.noise = float(torch.linalg.svdvals(rec[1])[0]) if rec is not None else 0.0
    return cand


def _reconstruct(y, w, psi, up, vq) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(Q_Y, core)`` with ``G⊥ ≈ Q_Y · core`` from the sketches; None if they hold nothing."""
    y = _project_off(y, up, "left")
    w = _project_off(w, vq, "right")
    if not bool(torch.isfinite(y).all() and torch.isfinite(w).all()):
        return None
    # range basis of the sketch, dropping directions at round-off level: they carry no
    # gradient and would make the co-range solve ill-conditioned (process-layout dependent)
    uy, sy, _ = torch.linalg.svd(y, full_matrices=False)
    qy = uy[:, sy > 1e-6 * float(sy.max())] if sy.numel() and float(sy.max()) > 0 else uy[:, :0]
    if qy.shape[1] == 0:
        return None
    qa, ra = torch.linalg.qr(psi @ qy)  # least squares (Ψ' Q_Y) core = W via QR (deterministic)
    if bool((torch.diagonal(ra).abs() < 1e-12 * ra.abs().max().clamp_min(1e-300)).any()):
        return None
    return qy, torch.linalg.solve_triangular(ra, qa.T @ w, upper=True)  # (l1, d_in)
