r"""Per-layer initialisations of ``ΔW = s · P diag(λ) Q`` (``s`` = the layer's scaling).

Every strategy leaves the layer's function unchanged at init, in one of two ways:

* **zero-delta** (``lora``, ``activations``, ``gradient``): ΔW = 0 because λ = 0 or P = 0;
* **offset** (``svd``, ``covariance``): ΔW_init = s·P diag(λ) Q equals a low-rank piece of W,
  and the same piece is moved out of the frozen base with ``layer.shift_base`` (recorded in the
  ``shift_P``/``shift_Q`` buffers and saved with the adapter, so the adapter applies to the
  original base weights). Caveat for rank allocation: pruning such a triplet removes a piece of
  the pretrained weight, not just a learned update.

Directions are stored with unit-norm P columns and Q rows where the maths allows it (the
magnitude lives in λ), the convention of :class:`~adarank.modules.SVDLoRALinear`.

Strategies (docs/theory.md §Data-informed initialisation):
    ``lora``        random orthonormal P, Q, λ = 0 (the layer's default; re-drawn when the rank
                    changed).
    ``svd``         PiSSA (Meng et al. 2024, §3): ``W = U S Vᵀ``; P = U_r, λ = S_r / s, Q = V_rᵀ.
    ``covariance``  CorDA (Yang et al. 2024, §3.1–3.2): SVD of ``W C`` with the damped second
                    moment C, right factor ``Vᵀ C⁻¹`` (or whitened: SVD of ``W C^{1/2}``,
                    right factor ``Vᵀ C^{-1/2}``, the optimal data-weighted rank-r truncation);
                    top ("instruction-previewed") or bottom ("knowledge-preserved") components.
    ``activations`` EVA (Paischer et al. 2024, §3.2): Q = top eigenvectors of the input second
                    moment, P = 0, λ = 1: like LoRA's B = 0, the first steps train P (whose
                    gradient ``s·G Qᵀ`` is the full-weight gradient seen through the principal
                    input directions); with λ = 0 instead, P and Q would get no gradient at all.
    ``gradient``    LoRA-GA-like (Wang et al. 2024, §3.2): ``G = Σ δ xᵀ = U S Vᵀ``; P = U_r,
                    Q = V_rᵀ, λ = 0. Then ``∂L/∂λ_i = s σ_i`` — the largest first-order decrease
                    any rank-r adapter can get — and no base offset is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from adarank.init.covariance import CovarianceEstimate
from adarank.modules import SVDLoRALinear

__all__ = [
    "STRATEGIES",
    "InitOptions",
    "apply_strategy",
    "needs_covariance",
    "needs_gradient",
    "orthonormal",
]

COVARIANCE_FORMS = {"corda": 1.0, "whitened": 0.5}
COMPONENTS = ("top", "bottom")


@dataclass(frozen=True)
class InitOptions:
    """Options of the data-aware strategies.

    Attributes:
        covariance_form: "corda" (``W C``) or "whitened" (``W C^{1/2}``).
        components: "top" or "bottom" singular components (``svd`` and ``covariance``).
        damping: ``C + damping · mean(diag C) · I`` before any inverse power.
    """

    covariance_form: str = "corda"
    components: str = "top"
    damping: float = 0.01

    def __post_init__(self) -> None:
        if self.covariance_form not in COVARIANCE_FORMS:
            raise ValueError(
                f"covariance_form={self.covariance_form!r} is not one of {list(COVARIANCE_FORMS)}"
            )
        if self.components not in COMPONENTS:
            raise ValueError(f"components={self.components!r} is not one of {list(COMPONENTS)}")
        if not (isinstance(self.damping, (int, float)) and self.damping >= 0):
            raise ValueError(f"damping={self.damping!r} must be a non-negative number")


def orthonormal(rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A float64 (rows, cols) matrix with orthonormal columns (rows ≥ cols) or rows."""
    g = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q if rows >= cols else q.T


def base_weight_matrix(layer: SVDLoRALinear) -> torch.Tensor:
    """The frozen weight in (d_out, d_in) layout, float64."""
    w = layer.base_weight.detach()
    return (w.T if layer.transposed else w).double()


def _select(count: int, rank: int, components: str) -> torch.Tensor:
    idx = torch.arange(rank) if components == "top" else torch.arange(count - rank, count)
    return idx


def _write(layer: SVDLoRALinear, P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor) -> None:
    r = layer.rank
    if P.shape != (layer.d_out, r) or lam.shape != (r,) or Q.shape != (r, layer.d_in):
        raise RuntimeError(
            f"internal shape error: P {tuple(P.shape)}, λ {tuple(lam.shape)}, Q {tuple(Q.shape)} "
            f"for rank {r}, (d_out, d_in)=({layer.d_out}, {layer.d_in})"
        )
    with torch.no_grad():
        layer.lora_P.copy_(P)
        layer.lora_lambda.copy_(lam)
        layer.lora_Q.copy_(Q)


def _offset(layer: SVDLoRALinear) -> None:
    """Move the freshly written ΔW out of the base so that W0' + ΔW = W0."""
    lam = layer.lora_lambda.detach().float() * layer.scaling
    layer.shift_base(layer.lora_P.detach().float() * lam, layer.lora_Q.detach().float())


def init_lora(layer, cov, grad, options, generator) -> None:
    _write(
        layer,
        orthonormal(layer.d_out, layer.rank, generator),
        torch.zeros(layer.rank),
        orthonormal(layer.rank, layer.d_in, generator),
    )


def init_svd(layer, cov, grad, options, generator) -> None:
    W = base_weight_matrix(layer)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    idx = _select(S.numel(), layer.rank, options.components)
    _write(layer, U[:, idx], S[idx] / layer.scaling, Vh[idx])
    _offset(layer)


def init_covariance(layer, cov: CovarianceEstimate, grad, options, generator) -> None:
    power = COVARIANCE_FORMS[options.covariance_form]
    C = cov.damped(options.damping)
    W = base_weight_matrix(layer)
    U, S, Vh = torch.linalg.svd(C.apply_power(W, power), full_matrices=False)  # W C^p
    idx = _select(S.numel(), layer.rank, options.components)
    Q_raw = C.apply_power(Vh[idx], -power)  # rows of Vᵀ C^{-p}: W = U S Vᵀ C^{-p}
    norms = Q_raw.norm(dim=1).clamp_min(1e-300)
    _write(layer, U[:, idx], S[idx] * norms / layer.scaling, Q_raw / norms[:, None])
    _offset(layer)


def init_activations(layer, cov: CovarianceEstimate, grad, options, generator) -> None:
    r = layer.rank
    Q = cov.evecs[:, :r].T.cpu()  # (≤ r, d_in) top eigenvectors
    if Q.shape[0] < r:  # sketched estimate with fewer stored directions: complete the basis
        extra = orthonormal(layer.d_in, r - Q.shape[0], generator)
        extra = extra - Q.T @ (Q @ extra)
        Q = torch.cat([Q, torch.linalg.qr(extra).Q.T])
    _write(layer, torch.zeros(layer.d_out, r, dtype=torch.float64), torch.ones(r), Q)


def init_gradient(layer, cov, grad: torch.Tensor, options, generator) -> None:
    U, S, Vh = torch.linalg.svd(grad.double().cpu(), full_matrices=False)
    r = layer.rank
    _write(layer, U[:, :r], torch.zeros(r), Vh[:r])


StrategyFn = Callable[..., None]
STRATEGIES: dict[str, StrategyFn] = {
    "lora": init_lora,
    "svd": init_svd,
    "covariance": init_covariance,
    "activations": init_activations,
    "gradient": init_gradient,
}


def needs_covariance(strategy: str) -> bool:
    return strategy in ("covariance", "activations")


def needs_gradient(strategy: str) -> bool:
    return strategy == "gradient"


def apply_strategy(
    layer: SVDLoRALinear,
    strategy: str,
    *,
    covariance: CovarianceEstimate | None = None,
    gradient: torch.Tensor | None = None,
    options: InitOptions | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """Initialise one layer in place at its current live rank (rank 0: nothing to do).

    Raises:
        ValueError: unknown strategy, or the statistics it needs are missing.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown init strategy {strategy!r}; valid: {sorted(STRATEGIES)}")
    if needs_covariance(strategy) and covariance is None:
        raise ValueError(f"init strategy {strategy!r} needs the layer's input covariance")
    if needs_gradient(strategy) and gradient is None:
        raise ValueError(f"init strategy {strategy!r} needs the layer's accumulated gradient")
    options = options or InitOptions()
    if options.components == "bottom" and strategy not in ("svd", "covariance"):
        raise ValueError(
            f"components='bottom' applies to the 'svd' and 'covariance' strategies, not {strategy!r}"
        )
    if layer.rank == 0:
        return
    STRATEGIES[strategy](layer, covariance, gradient, options, generator)
