r"""``initialize_adapters``: calibrate, choose starting ranks, initialise every adapter layer.

The one entry point the config layer and the CLI call (``adapter.init=...``)::

    report = initialize_adapters(model, "covariance", train_loader, num_batches=32)
    report.calibration_seconds        # compare with training time (target ≤ 5 %)

Order of work: (1) check that every adapter is fresh (not merged, no base shift, ΔW = 0);
(2) one calibration pass if the strategy or the allocation needs data; (3) optionally set each
layer's rank from the spectra under ``init_budget``; (4) apply the strategy layer by layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from adarank.init.allocation import ALLOCATION_SIGNALS, normalized_energies, starting_ranks
from adarank.init.calibration import calibrate
from adarank.init.shrinkage import SHRINKAGE_METHODS
from adarank.init.strategies import (
    STRATEGIES,
    InitOptions,
    apply_strategy,
    needs_covariance,
    needs_gradient,
)
from adarank.modules import SVDLoRALinear, adapter_layers

__all__ = ["InitReport", "initialize_adapters", "STRATEGY_NAMES"]

STRATEGY_NAMES = tuple(STRATEGIES)
SPECTRUM_KEEP = 32  # leading spectrum values stored per layer in the report


@dataclass
class InitReport:
    """What :func:`initialize_adapters` did.

    Attributes:
        strategy: the strategy name.
        ranks: layer → starting rank.
        live_params: adapter parameters at the starting ranks.
        calibration_seconds: wall time of the calibration pass (0 if none ran).
        init_seconds: wall time of allocation + decompositions.
        num_batches: calibration batches used.
        tokens: layer → calibration rows seen by the covariance estimate.
        spectra: layer → leading normalised energies of the allocation signal (≤ 32 values).
        init_budget: parameter budget of the starting allocation (None: ranks kept).
        options: the strategy options used.
    """

    strategy: str
    ranks: dict[str, int]
    live_params: int
    calibration_seconds: float = 0.0
    init_seconds: float = 0.0
    num_batches: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    spectra: dict[str, list[float]] = field(default_factory=dict)
    init_budget: int | None = None
    options: dict = field(default_factory=dict)

    def overhead(self, train_seconds: float) -> float:
        """Calibration + init time as a fraction of ``train_seconds``."""
        if train_seconds <= 0:
            raise ValueError(f"train_seconds={train_seconds} must be positive")
        return (self.calibration_seconds + self.init_seconds) / train_seconds

    def to_dict(self) -> dict:
        return asdict(self)


def _check_fresh(name: str, layer: SVDLoRALinear) -> None:
    if layer.merged:
        raise ValueError(f"adapter layer {name!r} is merged; initialise before merging")
    if layer.shift_P.shape[1]:
        raise ValueError(
            f"adapter layer {name!r} already has a base shift from an earlier init; "
            "initialise a freshly injected model"
        )
    if layer.rank and float(layer.delta_weight().detach().abs().max()) != 0.0:
        raise ValueError(
            f"adapter layer {name!r} has a non-zero ΔW; initialize_adapters expects freshly "
            "injected adapters (λ = 0)"
        )


def initialize_adapters(
    model: nn.Module,
    strategy: str,
    batches: Iterable | None = None,
    *,
    forward_fn: Callable[[nn.Module, object], object] | None = None,
    num_batches: int = 16,
    shrinkage: str = "none",
    covariance_form: str = "corda",
    components: str = "top",
    damping: float = 0.01,
    init_budget: int | None = None,
    allocate_ranks: bool = False,
    allocation_signal: str | None = None,
    min_rank: int = 0,
    max_rank: int | None = None,
    max_tokens_per_batch: int | None = 256,
    sketch_threshold: int = 4096,
    sketch_rank: int = 256,
    seed: int = 0,
) -> InitReport:
    """Initialise every adapter layer of ``model`` with ``strategy``.

    Args:
        model: model with freshly injected adapters (``adarank.add_adapters``).
        strategy: one of ``lora``, ``svd``, ``covariance``, ``activations``, ``gradient``
            (see :mod:`adarank.init.strategies`).
        batches: calibration batches (needed by ``covariance``, ``activations``, ``gradient``
            and by ``allocate_ranks``); only the first ``num_batches`` are used.
        forward_fn: ``forward_fn(model, batch)``; must return the loss (or an output with
            ``.loss``) for ``gradient``. Default: ``model(**batch)`` / ``model(*batch)``.
        num_batches: calibration batches.
        shrinkage: "none", "ledoit_wolf" or "oas" for the covariance estimate.
        covariance_form: "corda" (``W C``) or "whitened" (``W C^{1/2}``).
        components: "top" or "bottom" (``svd`` and ``covariance``).
        damping: relative damping of C before inverse powers.
        init_budget: parameter budget of the starting allocation; default: the adapters'
            current live parameters (uniform ``init_rank`` redistributed).
        allocate_ranks: choose starting ranks from the spectra instead of keeping the
            injected ranks.
        allocation_signal: "covariance" or "gradient"; default "gradient" for the gradient
            strategy, else "covariance".
        min_rank: per-layer lower bound of the starting allocation.
        max_rank: per-layer upper bound (default: each layer's ``max_rank``).
        max_tokens_per_batch: row subsample per batch and layer input in calibration.
        sketch_threshold: ``d_in`` above which a Nyström sketch replaces the dense ``d × d``.
        sketch_rank: sketch size ℓ.
        seed: seed for the subsampling, the sketch and any random directions.

    Returns:
        an :class:`InitReport`.

    Raises:
        ValueError: unknown strategy/option names (valid ones listed), no adapters, non-fresh
            adapters, or calibration data missing where it is needed.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown adapter init strategy {strategy!r}; valid: {list(STRATEGIES)}")
    if shrinkage not in SHRINKAGE_METHODS:
        raise ValueError(f"shrinkage={shrinkage!r} is not one of {list(SHRINKAGE_METHODS)}")
    options = InitOptions(covariance_form=covariance_form, components=components, damping=damping)
    if components == "bottom" and strategy not in ("svd", "covariance"):
        raise ValueError(f"components='bottom' applies to 'svd' and 'covariance', not {strategy!r}")
    signal = allocation_signal or ("gradient" if strategy == "gradient" else "covariance")
    if signal not in ALLOCATION_SIGNALS:
        raise ValueError(f"allocation_signal={signal!r} is not one of {list(ALLOCATION_SIGNALS)}")
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapter layers: call adarank.add_adapters first")
    for name, layer in layers.items():
        _check_fresh(name, layer)

    want_cov = needs_covariance(strategy) or (allocate_ranks and signal == "covariance")
    want_grad = needs_gradient(strategy) or (allocate_ranks and signal == "gradient")
    report = InitReport(strategy, {}, 0, options=asdict(options) | {"shrinkage": shrinkage})
    stats = None
    if want_cov or want_grad:
        if batches is None:
            why = f"strategy {strategy!r}" if not allocate_ranks else "allocate_ranks=True"
            raise ValueError(f"{why} needs calibration batches (got batches=None)")
        stats = calibrate(
            model,
            batches,
            forward_fn=forward_fn,
            num_batches=num_batches,
            layers=layers,
            covariance=want_cov,
            gradient=want_grad,
            max_tokens_per_batch=max_tokens_per_batch,
            sketch_threshold=sketch_threshold,
            sketch_rank=sketch_rank,
            seed=seed,
        )
        report.calibration_seconds = stats.seconds
        report.num_batches = stats.num_batches
        report.tokens = stats.tokens()

    start = time.perf_counter()
    estimates = {n: a.estimate(shrinkage) for n, a in stats.covariances.items()} if stats else {}
    generator = torch.Generator().manual_seed(seed)
    resized: set[str] = set()
    if allocate_ranks:
        if signal == "covariance":
            spectra = {n: e.spectrum() for n, e in estimates.items()}
        else:
            spectra = {n: torch.linalg.svdvals(g) for n, g in stats.gradients.items()}
        energies = normalized_energies(spectra, signal)
        budget = (
            sum(ly.live_params for ly in layers.values()) if init_budget is None else init_budget
        )
        caps = {
            n: ly.max_rank if max_rank is None else min(max_rank, ly.max_rank)
            for n, ly in layers.items()
        }
        ranks = starting_ranks(
            energies,
            {n: ly.triplet_cost for n, ly in layers.items()},
            int(budget),
            min_rank=min_rank,
            max_rank=caps,
        )
        for name, r in ranks.items():
            if r != layers[name].rank:
                layers[name].set_rank(r)
                resized.add(name)
        report.init_budget = int(budget)
        report.spectra = {n: e[:SPECTRUM_KEEP].tolist() for n, e in energies.items()}
    elif estimates:
        report.spectra = {
            n: e.explained_variance_ratio()[:SPECTRUM_KEEP].tolist() for n, e in estimates.items()
        }
    for name, layer in layers.items():
        if strategy == "lora" and name not in resized:
            continue  # keep the injected random init untouched
        apply_strategy(
            layer,
            strategy,
            covariance=estimates.get(name),
            gradient=stats.gradients.get(name) if stats else None,
            options=options,
            generator=generator,
        )
    report.init_seconds = time.perf_counter() - start
    report.ranks = {n: ly.rank for n, ly in layers.items()}
    report.live_params = sum(ly.live_params for ly in layers.values())
    return report
