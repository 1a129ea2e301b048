r"""Streaming estimates of a layer's input second moment ``C = E[x xᵀ]`` (float64).

The inits use the **uncentred second moment** ``C = E[x xᵀ]`` — the matrix that weighs a
weight error by the data, ``E‖ΔW x‖² = tr(ΔW C ΔWᵀ)`` (CorDA's ``XᵀX``, docs/theory.md §Data-informed initialisation). It is
computed from the numerically stable centred statistics ``(n, mean, M2)`` of Chan, Golub &
LeVeque (1979): ``C = M2/n + μ μᵀ``, so the centred covariance ``M2/n`` is available too.

Merging two partial results (batches, or processes under DDP) is Chan's pairwise update::

    n = n_a + n_b,   δ = μ_b − μ_a,   μ = μ_a + δ n_b / n,
    M2 = M2_a + M2_b + δ δᵀ n_a n_b / n

The mean of ``‖x‖⁴`` is carried as well (merged as a weighted mean): Ledoit–Wolf shrinkage
needs it (:mod:`adarank.init.shrinkage`). Wide inputs (``d_in`` above a cap) use the
randomized sketch in :mod:`adarank.init.sketch` instead of a dense ``d × d`` matrix.

Every estimator returns a :class:`CovarianceEstimate`: ``C ≈ V diag(e) Vᵀ + ρ (I − V Vᵀ)``
(dense: V is a full eigenbasis and ρ = 0; sketch: top-ℓ eigenpairs plus an isotropic rest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from adarank.init.shrinkage import shrink_spectrum

__all__ = ["CovarianceEstimate", "SecondMomentAccumulator", "all_reduce_accumulators"]


@dataclass
class CovarianceEstimate:
    """Spectral form ``C ≈ V diag(evals) Vᵀ + residual · (I − V Vᵀ)`` of a PSD matrix.

    Attributes:
        evals: (k,) float64 eigenvalues, descending, non-negative.
        evecs: (d, k) float64 orthonormal eigenvectors.
        residual: eigenvalue of every direction orthogonal to ``evecs`` (0 when k = d).
        count: number of samples behind the estimate.
    """

    evals: torch.Tensor
    evecs: torch.Tensor
    residual: float
    count: int

    @property
    def dim(self) -> int:
        return self.evecs.shape[0]

    @property
    def rest(self) -> int:
        """Number of directions described only by ``residual``."""
        return self.dim - self.evecs.shape[1]

    def trace(self) -> float:
        return float(self.evals.sum()) + self.rest * self.residual

    def frobenius_sq(self) -> float:
        return float((self.evals**2).sum()) + self.rest * self.residual**2

    def spectrum(self) -> torch.Tensor:
        """All ``d`` eigenvalues, descending (the residual repeated for the rest)."""
        rest = torch.full((self.rest,), self.residual, dtype=self.evals.dtype)
        return torch.cat([self.evals.cpu(), rest]).sort(descending=True).values

    def explained_variance_ratio(self) -> torch.Tensor:
        """``e_i / Σ e`` over all ``d`` directions (EVA's allocation signal)."""
        spec = self.spectrum()
        total = spec.sum()
        return spec / total if total > 0 else torch.zeros_like(spec)

    def damped(self, damping: float) -> CovarianceEstimate:
        """``C + damping · mean(diag C) · I`` (CorDA's damping; docs/theory.md)."""
        if not damping >= 0:
            raise ValueError(f"damping={damping} must be a non-negative number")
        shift = damping * self.trace() / self.dim
        return CovarianceEstimate(self.evals + shift, self.evecs, self.residual + shift, self.count)

    def dense(self) -> torch.Tensor:
        """The (d, d) matrix."""
        V = self.evecs
        out = (V * self.evals) @ V.T
        if self.rest:
            out = out + self.residual * (
                torch.eye(self.dim, dtype=V.dtype, device=V.device) - V @ V.T
            )
        return out

    def apply_power(self, M: torch.Tensor, power: float) -> torch.Tensor:
        """``M · C^power`` for ``M`` of shape (m, d), without forming ``C``.

        Raises:
            ValueError: a negative power of a singular estimate (use damping > 0).
        """
        if power < 0 and (float(self.evals.min()) <= 0 or (self.rest and self.residual <= 0)):
            raise ValueError(
                f"C^{power} needs a positive-definite estimate; smallest eigenvalue is "
                f"{min(float(self.evals.min()), self.residual if self.rest else float('inf')):.3g} "
                "(use damping > 0)"
            )
        V = self.evecs.to(M.device, torch.float64)
        M = M.to(torch.float64)
        MV = M @ V  # (m, k)
        out = (MV * self.evals.to(M.device) ** power) @ V.T
        if self.rest:
            out = out + self.residual**power * (M - MV @ V.T)
        return out


class SecondMomentAccumulator:
    """Dense streaming ``(n, mean, M2, mean‖x‖⁴)`` in float64 with Chan's pairwise merge.

    Args:
        dim: input dimension d.
        device: where the (d, d) statistics live (default CPU).
    """

    kind = "dense"

    def __init__(self, dim: int, device: torch.device | str | None = None) -> None:
        if int(dim) < 1:
            raise ValueError(f"dim={dim} must be a positive integer")
        self.dim = int(dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.count = 0
        self.mean = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self.m2 = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        self.norm4_mean = 0.0

    def config_key(self) -> tuple:
        return (self.kind, self.dim)

    def spawn(self) -> SecondMomentAccumulator:
        """An empty accumulator with the same configuration."""
        return SecondMomentAccumulator(self.dim, self.device)

    def update(self, x: torch.Tensor) -> SecondMomentAccumulator:
        """Add the rows of ``x`` (n, d) (any leading shape is flattened)."""
        x = x.detach().reshape(-1, self.dim).to(self.device, torch.float64)
        if x.shape[0] == 0:
            return self
        batch = self.spawn()
        batch.count = x.shape[0]
        batch.mean = x.mean(0)
        xc = x - batch.mean
        batch.m2 = xc.T @ xc
        batch.norm4_mean = float(x.pow(2).sum(1).pow(2).mean())
        return self.merge(batch)

    def merge(self, other: SecondMomentAccumulator) -> SecondMomentAccumulator:
        """Chan et al.'s pairwise merge of ``other`` into ``self`` (in place); returns self."""
        if not isinstance(other, SecondMomentAccumulator) or other.dim != self.dim:
            raise ValueError(
                f"cannot merge {type(other).__name__}(dim={getattr(other, 'dim', None)}) into "
                f"SecondMomentAccumulator(dim={self.dim})"
            )
        if other.count == 0:
            return self
        if self.count == 0:
            self.count = other.count
            self.mean = other.mean.to(self.device).clone()
            self.m2 = other.m2.to(self.device).clone()
            self.norm4_mean = other.norm4_mean
            return self
        na, nb = self.count, other.count
        n = na + nb
        delta = other.mean.to(self.device) - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + other.m2.to(self.device) + torch.outer(delta, delta) * (na * nb / n)
        self.norm4_mean = self.norm4_mean * (na / n) + other.norm4_mean * (nb / n)
        self.count = n
        return self

    def second_moment(self) -> torch.Tensor:
        """``E[x xᵀ] = M2/n + μ μᵀ`` (d, d), the matrix the inits use."""
        self._check_nonempty()
        return self.m2 / self.count + torch.outer(self.mean, self.mean)

    def covariance(self) -> torch.Tensor:
        """Centred covariance ``M2/n`` (d, d) (maximum-likelihood normalisation)."""
        self._check_nonempty()
        return self.m2 / self.count

    def _check_nonempty(self) -> None:
        if self.count == 0:
            raise ValueError("the accumulator has seen no samples (count=0)")

    def estimate(self, shrinkage: str = "none") -> CovarianceEstimate:
        """Eigendecomposition of the (optionally shrunk) second moment."""
        S = self.second_moment()
        evals, evecs = torch.linalg.eigh((S + S.T) / 2)
        raw = CovarianceEstimate(evals.flip(0).clamp_min(0), evecs.flip(1), 0.0, self.count)
        return shrink_spectrum(raw, shrinkage, self.norm4_mean)

    def all_reduce_(self) -> None:
        """Merge the statistics of all DDP processes (same result on every rank)."""
        world = dist.get_world_size()
        packed = torch.cat(
            [
                torch.tensor([float(self.count), self.norm4_mean], dtype=torch.float64),
                self.mean.cpu(),
                self.m2.cpu().flatten(),
            ]
        )
        comm_device = _comm_device(self.device)
        packed = packed.to(comm_device)
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed)
        merged = self.spawn()
        d = self.dim
        for g in gathered:  # rank order, so every process merges identically
            part = self.spawn()
            part.count = int(round(float(g[0])))
            part.norm4_mean = float(g[1])
            part.mean = g[2 : 2 + d].to(self.device)
            part.m2 = g[2 + d :].reshape(d, d).to(self.device)
            merged.merge(part)
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2
        self.norm4_mean = merged.norm4_mean


def _comm_device(device: torch.device) -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else device


def all_reduce_accumulators(accumulators: dict) -> bool:
    """Merge every accumulator across DDP processes when ``torch.distributed`` is initialised.

    Returns:
        True if a cross-process merge happened, False in a single process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    for name in sorted(accumulators):
        accumulators[name].all_reduce_()
    return True
