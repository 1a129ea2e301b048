"""Calibration and data-informed initialisation of the adapters (docs/theory.md).

Public API: :func:`initialize_adapters` (the entry point), :func:`calibrate`, the covariance
estimators and shrinkage, the per-layer strategies and the starting allocation.
"""

from adarank.init.allocation import normalized_energies, starting_ranks
from adarank.init.calibration import CalibrationResult, calibrate
from adarank.init.covariance import (
    CovarianceEstimate,
    SecondMomentAccumulator,
    all_reduce_accumulators,
)
from adarank.init.initialize import STRATEGY_NAMES, InitReport, initialize_adapters
from adarank.init.shrinkage import SHRINKAGE_METHODS, ledoit_wolf_intensity, oas_intensity
from adarank.init.sketch import NystromSketch
from adarank.init.strategies import InitOptions, apply_strategy

__all__ = [
    "SHRINKAGE_METHODS",
    "STRATEGY_NAMES",
    "CalibrationResult",
    "CovarianceEstimate",
    "InitOptions",
    "InitReport",
    "NystromSketch",
    "SecondMomentAccumulator",
    "all_reduce_accumulators",
    "apply_strategy",
    "calibrate",
    "initialize_adapters",
    "ledoit_wolf_intensity",
    "normalized_energies",
    "oas_intensity",
    "starting_ranks",
]
