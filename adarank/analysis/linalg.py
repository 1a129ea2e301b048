r"""Linear algebra of adapter updates (LoRA paper, Hu et al. 2021, Section 7).

Every quantity here works on the factors of ``ΔW = scaling · P · diag(λ) · Q`` without forming
the dense ``(d_out, d_in)`` matrix::

    P = Q_P R_P          (QR, Q_P: (d_out, k))
    Qᵀ = Q_Q R_Q         (QR, Q_Q: (d_in, k))
    C = scaling · R_P diag(λ) R_Qᵀ  = U_C S V_Cᵀ      (SVD of the small k×k core)
    ΔW = (Q_P U_C) S (Q_Q V_C)ᵀ = U S Vᵀ

All functions take and return float64 numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "DeltaSVD",
    "delta_svd",
    "effective_rank",
    "energy_rank",
    "subspace_similarity",
    "subspace_similarity_grid",
    "random_subspace_baseline",
    "projection_norm",
    "top_singular_norm",
    "random_orthonormal",
    "delta_vs_weight",
]

#: singular values below this fraction of the largest are treated as zero (numerical rank)
RELATIVE_TOL = 1e-7


@dataclass(frozen=True)
class DeltaSVD:
    """Thin SVD ``ΔW = U diag(S) Vh`` truncated to the numerical rank.

    Attributes:
        U: (d_out, k) left singular vectors.
        S: (k,) singular values, descending, all > ``RELATIVE_TOL · S[0]``.
        Vh: (k, d_in) right singular vectors (rows): the row space of ΔW.
    """

    U: np.ndarray
    S: np.ndarray
    Vh: np.ndarray

    @property
    def rank(self) -> int:
        """Numerical rank of ΔW."""
        return int(self.S.shape[0])

    @property
    def frobenius(self) -> float:
        """``‖ΔW‖_F = ‖S‖₂``."""
        return float(np.sqrt(np.sum(self.S**2)))


def delta_svd(P: np.ndarray, lam: np.ndarray, Q: np.ndarray, scaling: float = 1.0) -> DeltaSVD:
    """SVD of ``ΔW = scaling · P diag(λ) Q`` from the factors (QR + SVD of the r×r core).

    Args:
        P: (d_out, r) left factor.
        lam: (r,) singular-value-like scales λ.
        Q: (r, d_in) right factor.
        scaling: the adapter's constant factor.

    Returns:
        the thin SVD truncated to the numerical rank (rank 0 when ΔW = 0).

    Raises:
        ValueError: inconsistent shapes.
    """
    P, lam, Q = (np.asarray(a, dtype=np.float64) for a in (P, lam, Q))
    if P.ndim != 2 or Q.ndim != 2 or lam.ndim != 1:
        raise ValueError(
            f"expected P (d_out, r), lambda (r,), Q (r, d_in); got shapes "
            f"{P.shape}, {lam.shape}, {Q.shape}"
        )
    r = lam.shape[0]
    if P.shape[1] != r or Q.shape[0] != r:
        raise ValueError(
            f"rank mismatch: P has {P.shape[1]} columns, lambda {r} entries, Q {Q.shape[0]} rows"
        )
    d_out, d_in = P.shape[0], Q.shape[1]
    if r == 0:
        return DeltaSVD(np.zeros((d_out, 0)), np.zeros(0), np.zeros((0, d_in)))
    qp, rp = np.linalg.qr(P)  # (d_out, k1), (k1, r)
    qq, rq = np.linalg.qr(Q.T)  # (d_in, k2), (k2, r)
    core = float(scaling) * (rp * lam) @ rq.T  # (k1, k2)
    uc, s, vch = np.linalg.svd(core, full_matrices=False)
    keep = _numerical_rank(s)
    U = qp @ uc[:, :keep]  # (d_out, k)
    Vh = vch[:keep] @ qq.T  # (k, d_in)
    return DeltaSVD(U, s[:keep], Vh)


def _numerical_rank(s: np.ndarray) -> int:
    if s.size == 0 or s[0] <= 0 or not np.isfinite(s[0]):
        return 0
    return int(np.sum(s > RELATIVE_TOL * s[0]))


def effective_rank(s: np.ndarray) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): ``exp(−Σ p_i log p_i)``, ``p = σ / ‖σ‖₁``.

    Equals k for k equal non-zero singular values and 0 for a zero matrix.
    """
    s = np.asarray(s, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def energy_rank(s: np.ndarray, fraction: float = 0.9) -> int:
    """Smallest k with ``Σ_{i≤k} σ_i² ≥ fraction · Σ σ_i²`` (0 for a zero matrix)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1]
    total = float(np.sum(s**2))
    if total <= 0:
        return 0
    cum = np.cumsum(s**2) / total
    return int(np.searchsorted(cum, fraction - 1e-12) + 1)


def _check_bases(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"subspace bases must be (d, i) and (d, j) with the same d; got {a.shape} and {b.shape}"
        )
    return a, b


def subspace_similarity_grid(U1: np.ndarray, U2: np.ndarray) -> np.ndarray:
    """All ``φ(A1, A2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j)`` (LoRA Section 7.2).

    Args:
        U1: (d, r1) orthonormal columns, ordered by importance (top singular vectors first).
        U2: (d, r2) likewise.

    Returns:
        (r1, r2) array; entry ``[i-1, j-1]`` is φ for the top-i and top-j subspaces, in [0, 1].
    """
    U1, U2 = _check_bases(U1, U2)
    m2 = (U1.T @ U2) ** 2  # (r1, r2)
    sums = np.cumsum(np.cumsum(m2, axis=0), axis=1)
    i = np.arange(1, m2.shape[0] + 1)[:, None]
    j = np.arange(1, m2.shape[1] + 1)[None, :]
    return np.clip(sums / np.minimum(i, j), 0.0, 1.0)


def subspace_similarity(
    U1: np.ndarray, U2: np.ndarray, i: int | None = None, j: int | None = None
) -> float:
    """``φ(A1, A2, i, j)`` for one (i, j); default the full bases (LoRA Section 7.2)."""
    U1, U2 = _check_bases(U1, U2)
    i = U1.shape[1] if i is None else int(i)
    j = U2.shape[1] if j is None else int(j)
    if not (1 <= i <= U1.shape[1] and 1 <= j <= U2.shape[1]):
        raise ValueError(f"i={i}, j={j} must be in [1, {U1.shape[1]}] and [1, {U2.shape[1]}]")
    m = U1[:, :i].T @ U2[:, :j]
    return float(np.sum(m**2) / min(i, j))


def random_subspace_baseline(i: int, j: int, d: int) -> float:
    """Expected φ for independent uniformly random i- and j-dim subspaces of R^d.

    ``E‖U_iᵀ U_j‖_F² = i·j/d`` (each of the j unit columns of U_j keeps i/d of its energy in
    a random i-dim subspace), hence ``E φ = i·j / (d · min(i, j)) = max(i, j) / d``.
    """
    if min(i, j, d) < 1:
        raise ValueError(f"i={i}, j={j}, d={d} must all be >= 1")
    return max(i, j) / d


def random_orthonormal(d: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """A (d, k) matrix with Haar-random orthonormal columns."""
    q, r = np.linalg.qr(rng.standard_normal((d, k)))
    return q * np.sign(np.diagonal(r))[None, :]


def projection_norm(W: np.ndarray, U: np.ndarray, Vh: np.ndarray) -> float:
    """``‖Uᵀ W Vᵀ‖_F``: the part of W inside the left/right subspaces (U: (d_out, r), Vh: (r, d_in))."""
    return float(np.linalg.norm(U.T @ W @ Vh.T))


def top_singular_norm(W: np.ndarray, r: int) -> float:
    """``sqrt(σ_1² + … + σ_r²)`` of W, from the eigenvalues of the smaller Gram matrix.

    ``WWᵀ`` (or ``WᵀW``) has eigenvalues σ_i²; its eigvalsh costs O(d_small²·d_large), much
    less than a full SVD of a wide matrix, and the sum of the top-r eigenvalues is accurate to
    about ``eps·σ_1²``.
    """
    W = np.asarray(W, dtype=np.float64)
    gram = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
    eig = np.linalg.eigvalsh(gram)  # ascending
    top = np.clip(eig[::-1][: max(int(r), 0)], 0.0, None)
    return float(np.sqrt(np.sum(top)))


def delta_vs_weight(
    W: np.ndarray, svd: DeltaSVD, rng: np.random.Generator
) -> dict[str, float | int | None]:
    """Compare ΔW with the pre-trained W (LoRA Section 7.3, Table 7).

    Projects W onto three r-dimensional (left, right) subspace pairs, r = rank of ΔW:
    ΔW's own singular directions, W's own top-r singular directions and random directions.

    Args:
        W: (d_out, d_in) pre-trained weight.
        svd: the thin SVD of ΔW.
        rng: for the random directions.

    Returns:
        ``rank``, ``delta_norm`` ‖ΔW‖_F, ``w_norm`` ‖W‖_F, ``proj_delta_dirs`` ‖UᵀWVᵀ‖_F,
        ``proj_w_dirs``, ``proj_random_dirs``, ``random_expected`` (√(r²‖W‖²/(d_out d_in)), the
        root-mean-square over random directions), ``amplification`` ‖ΔW‖_F / ‖UᵀWVᵀ‖_F
        (``None`` when ΔW = 0 or the projection vanishes).
    """
    W = np.asarray(W, dtype=np.float64)
    d_out, d_in = svd.U.shape[0], svd.Vh.shape[1]
    if W.shape != (d_out, d_in):
        raise ValueError(f"W has shape {W.shape}, ΔW has (d_out, d_in)=({d_out}, {d_in})")
    r = svd.rank
    w_norm = float(np.linalg.norm(W))
    out: dict[str, float | int | None] = {"rank": r, "delta_norm": svd.frobenius, "w_norm": w_norm}
    if r == 0:
        out.update(
            proj_delta_dirs=None,
            proj_w_dirs=None,
            proj_random_dirs=None,
            random_expected=None,
            amplification=None,
        )
        return out
    proj_delta = projection_norm(W, svd.U, svd.Vh)
    proj_w = top_singular_norm(W, r)  # = ‖U_Wᵀ W V_W‖_F for W's top-r directions
    Ur, Vr = random_orthonormal(d_out, r, rng), random_orthonormal(d_in, r, rng)
    out.update(
        proj_delta_dirs=proj_delta,
        proj_w_dirs=proj_w,
        proj_random_dirs=projection_norm(W, Ur, Vr.T),
        random_expected=float(r * w_norm / np.sqrt(d_out * d_in)),
        amplification=svd.frobenius / proj_delta if proj_delta > 0 else None,
    )
    return out
