r"""Randomized Nyström sketch of ``E[x xᵀ]`` for very wide inputs (memory ``d·ℓ`` instead of ``d²``).

For ``d_in`` above a cap the dense accumulator would hold ``d²`` float64 numbers per layer
(16384² ≈ 2 GiB). Instead we keep, for a fixed random orthonormal test matrix Ω (d, ℓ)::

    Y = Σ_k x_k (x_kᵀ Ω)      (d, ℓ)     — linear in the data, so batches and DDP processes
                                            merge by plain summation (exactly the single pass)

plus exact ``Σ‖x‖²`` (the trace) and ``Σ‖x‖⁴``. The estimate is the stabilised Nyström
approximation ``C ≈ Y (Ωᵀ Y)⁺ Yᵀ`` of Tropp, Yurtsever, Udell & Cevher (2017), *Fixed-rank
approximation of a positive-semidefinite matrix from streaming data*, Algorithm 3: its top-ℓ
eigenpairs, with the trace not explained by them spread evenly over the other ``d − ℓ``
directions (so ``tr C`` is exact and negative powers such as ``C⁻¹`` stay defined).
Ω depends only on ``(d, ℓ, seed)``, so every process and every layer of the same width shares it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from adarank.init.covariance import CovarianceEstimate, _comm_device
from adarank.init.shrinkage import shrink_spectrum

__all__ = ["NystromSketch"]


class NystromSketch:
    """Streaming rank-ℓ Nyström sketch of the second moment.

    Args:
        dim: input dimension d.
        rank: sketch size ℓ (1 ≤ ℓ < d).
        seed: seed of the test matrix Ω.
        device: where the sketch lives.
    """

    kind = "sketch"

    def __init__(
        self, dim: int, rank: int, seed: int = 0, device: torch.device | str | None = None
    ) -> None:
        if not 1 <= int(rank) < int(dim):
            raise ValueError(f"sketch rank={rank} must be in [1, dim={dim})")
        self.dim, self.rank, self.seed = int(dim), int(rank), int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        g = torch.Generator().manual_seed(self.seed)
        omega = torch.randn(self.dim, self.rank, generator=g, dtype=torch.float64)
        self.omega = torch.linalg.qr(omega).Q.to(self.device)  # (d, ℓ)
        self.count = 0
        self.y_sum = torch.zeros(self.dim, self.rank, dtype=torch.float64, device=self.device)
        self.sq_sum = 0.0  # Σ ‖x‖²
        self.norm4_sum = 0.0  # Σ ‖x‖⁴

    def config_key(self) -> tuple:
        return (self.kind, self.dim, self.rank, self.seed)

    def spawn(self) -> NystromSketch:
        out = NystromSketch.__new__(NystromSketch)
        out.dim, out.rank, out.seed, out.device = self.dim, self.rank, self.seed, self.device
        out.omega = self.omega
        out.count, out.sq_sum, out.norm4_sum = 0, 0.0, 0.0
        out.y_sum = torch.zeros_like(self.y_sum)
        return out

    def update(self, x: torch.Tensor) -> NystromSketch:
        """Add the rows of ``x`` (n, d)."""
        x = x.detach().reshape(-1, self.dim).to(self.device, torch.float64)
        sq = x.pow(2).sum(1)
        self.y_sum += x.T @ (x @ self.omega)
        self.sq_sum += float(sq.sum())
        self.norm4_sum += float(sq.pow(2).sum())
        self.count += x.shape[0]
        return self

    def merge(self, other: NystromSketch) -> NystromSketch:
        """Add another sketch with the same Ω (in place); returns self."""
        if not isinstance(other, NystromSketch) or other.config_key() != self.config_key():
            raise ValueError(
                f"cannot merge {type(other).__name__} {getattr(other, 'config_key', lambda: None)()}"
                f" into NystromSketch {self.config_key()} (dim, rank and seed must match)"
            )
        self.y_sum += other.y_sum.to(self.device)
        self.sq_sum += other.sq_sum
        self.norm4_sum += other.norm4_sum
        self.count += other.count
        return self

    def estimate(self, shrinkage: str = "none") -> CovarianceEstimate:
        """Top-ℓ eigenpairs of the Nyström approximation plus an isotropic rest."""
        if self.count == 0:
            raise ValueError("the sketch has seen no samples (count=0)")
        Y = self.y_sum / self.count
        omega = self.omega
        nu = torch.finfo(torch.float64).eps * (self.dim**0.5) * float(torch.linalg.norm(Y))
        nu = max(nu, 1e-300)
        for _ in range(8):  # stabilising shift, enlarged if Cholesky still fails
            Y_nu = Y + nu * omega
            B = omega.T @ Y_nu
            L, info = torch.linalg.cholesky_ex((B + B.T) / 2)
            if int(info) == 0:
                break
            nu *= 100.0
        E = torch.linalg.solve_triangular(L, Y_nu.T, upper=False).T  # Y_ν L^{-T}
        U, s, _ = torch.linalg.svd(E, full_matrices=False)
        evals = (s**2 - nu).clamp_min(0)
        trace = self.sq_sum / self.count
        rest = self.dim - self.rank
        residual = max(trace - float(evals.sum()), 0.0) / rest
        raw = CovarianceEstimate(evals, U, residual, self.count)
        return shrink_spectrum(raw, shrinkage, self.norm4_sum / self.count)

    def all_reduce_(self) -> None:
        """Sum the sketches of all DDP processes."""
        packed = torch.cat(
            [
                torch.tensor([float(self.count), self.sq_sum, self.norm4_sum], dtype=torch.float64),
                self.y_sum.cpu().flatten(),
            ]
        ).to(_comm_device(self.device))
        dist.all_reduce(packed)
        self.count = int(round(float(packed[0])))
        self.sq_sum, self.norm4_sum = float(packed[1]), float(packed[2])
        self.y_sum = packed[3:].reshape(self.dim, self.rank).to(self.device)
