r"""Shrinkage of a sample second moment toward a scaled identity (few samples vs dimension).

With ``n`` samples of dimension ``p`` and ``n ≲ p`` the sample matrix ``S = (1/n) Σ x xᵀ`` is
singular and its eigenvalues are spread far wider than the true ones. Both estimators below
return ``Σ̂ = (1 − ρ) S + ρ μ I`` with ``μ = tr(S)/p`` and differ in the intensity ρ:

* **Ledoit–Wolf** (Ledoit & Wolf 2004, *A well-conditioned estimator for large-dimensional
  covariance matrices*, Lemma 3.2–3.4), with the normalised norm ``‖A‖² = tr(A Aᵀ)/p``::

      δ² = ‖S − μI‖²,   β̄² = (1/n²) Σ_k ‖x_k x_kᵀ − S‖² = (E‖x‖⁴ − ‖S‖_F²) / (n p),
      ρ  = min(β̄², δ²) / δ²

  (the sum over samples is rewritten with the streaming mean of ``‖x‖⁴``; the estimator only
  needs ``S`` to be an average of i.i.d. matrices ``x xᵀ``, so it applies to the second moment).
* **OAS** (Chen, Wiesel, Eldar & Hero 2010, *Shrinkage algorithms for MMSE covariance
  estimation*, Eq. 23)::

      ρ = min(1, [(1 − 2/p) tr(S²) + tr²(S)] / [(n + 1 − 2/p)(tr(S²) − tr²(S)/p)])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from adarank.init.covariance import CovarianceEstimate

__all__ = ["SHRINKAGE_METHODS", "ledoit_wolf_intensity", "oas_intensity", "shrink_spectrum"]

SHRINKAGE_METHODS = ("none", "ledoit_wolf", "oas")


def ledoit_wolf_intensity(
    trace: float, frobenius_sq: float, norm4_mean: float, count: int, dim: int
) -> float:
    """Ledoit–Wolf shrinkage intensity ρ ∈ [0, 1] from summary statistics.

    Args:
        trace: ``tr(S)``.
        frobenius_sq: ``‖S‖_F² = tr(S²)``.
        norm4_mean: ``(1/n) Σ_k ‖x_k‖⁴``.
        count: number of samples n.
        dim: dimension p.
    """
    mu = trace / dim
    delta_sq = (frobenius_sq - dim * mu * mu) / dim
    if delta_sq <= 0:
        return 1.0  # S is already a multiple of the identity
    beta_bar_sq = max(norm4_mean - frobenius_sq, 0.0) / (count * dim)
    return min(beta_bar_sq, delta_sq) / delta_sq


def oas_intensity(trace: float, frobenius_sq: float, count: int, dim: int) -> float:
    """Oracle-approximating shrinkage intensity ρ ∈ [0, 1] (Chen et al. 2010, Eq. 23)."""
    num = (1.0 - 2.0 / dim) * frobenius_sq + trace * trace
    den = (count + 1.0 - 2.0 / dim) * (frobenius_sq - trace * trace / dim)
    if den <= 0:
        return 1.0
    return min(1.0, num / den)


def shrink_spectrum(
    estimate: CovarianceEstimate, method: str, norm4_mean: float
) -> CovarianceEstimate:
    """Apply ``method`` ("none", "ledoit_wolf", "oas") to a spectral estimate.

    Shrinking toward ``μI`` keeps the eigenvectors and maps every eigenvalue
    ``e → (1 − ρ) e + ρ μ`` (the residual too), so it works on dense and sketched estimates.

    Raises:
        ValueError: unknown method.
    """
    if method not in SHRINKAGE_METHODS:
        raise ValueError(f"shrinkage={method!r} is not one of {list(SHRINKAGE_METHODS)}")
    if method == "none" or estimate.count == 0:
        return estimate
    trace, fro = estimate.trace(), estimate.frobenius_sq()
    if method == "ledoit_wolf":
        rho = ledoit_wolf_intensity(trace, fro, norm4_mean, estimate.count, estimate.dim)
    else:
        rho = oas_intensity(trace, fro, estimate.count, estimate.dim)
    mu = trace / estimate.dim
    return type(estimate)(
        (1 - rho) * estimate.evals + rho * mu,
        estimate.evecs,
        (1 - rho) * estimate.residual + rho * mu,
        estimate.count,
    )
