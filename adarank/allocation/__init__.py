"""Rank allocation engine (torch + numpy only): budget, schedule, importance, allocation,
growth, the capture hooks that record what allocation measures, and the :class:`RankController`
that a training loop drives."""

from adarank.allocation.allocator import AllocationPlan, allocate
from adarank.allocation.budget import DECAYS, BudgetSchedule, resolve_budget
from adarank.allocation.capture import CaptureSet, LayerCapture, install_capture
from adarank.allocation.controller import AllocationEvent, RankController
from adarank.allocation.growth import Candidates, growth_candidates, input_energy, randomized_svd
from adarank.allocation.importance import (
    SCORERS,
    EnergyScorer,
    MagnitudeScorer,
    Scorer,
    SensitivityScorer,
    make_scorer,
)
from adarank.allocation.optim_sync import replace_parameter
from adarank.allocation.regularizer import orthogonality_penalty

__all__ = [
    "DECAYS",
    "SCORERS",
    "AllocationEvent",
    "AllocationPlan",
    "BudgetSchedule",
    "Candidates",
    "CaptureSet",
    "EnergyScorer",
    "LayerCapture",
    "MagnitudeScorer",
    "RankController",
    "Scorer",
    "SensitivityScorer",
    "allocate",
    "growth_candidates",
    "input_energy",
    "install_capture",
    "make_scorer",
    "orthogonality_penalty",
    "randomized_svd",
    "replace_parameter",
    "resolve_budget",
]
