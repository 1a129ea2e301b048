"""``BudgetSchedule.from_fractions``: the one schedule construction the integrations share."""

from __future__ import annotations

import math

import pytest

from adarank.allocation import BudgetSchedule


def test_fractions_become_rounded_steps_and_init_budget():
    s = BudgetSchedule.from_fractions(1000, 95, init_budget_ratio=1.25, interval=5)
    # round(0.1·95) = 10 (9.5 rounds to even), round(0.2·95) = 19, b_0 = round(1.25·1000)
    assert (s.warmup_steps, s.final_steps, s.init_budget) == (10, 19, 1250)
    assert (s.final_budget, s.total_steps, s.interval, s.decay) == (1000, 95, 5, "cubic")
    assert s.allocation_steps() == [10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 76]
    assert s.budget(0) == 1250 and s.budget(76) == 1000


def test_steps_override_fractions_and_ratio_one_keeps_the_budget():
    s = BudgetSchedule.from_fractions(
        333, 40, init_budget_ratio=1, warmup_steps=3, final_steps=7, decay="linear"
    )
    assert (s.warmup_steps, s.final_steps, s.init_budget, s.decay) == (3, 7, 333, "linear")
    # a ratio whose product rounds below b_T never gives b_0 < b_T
    assert BudgetSchedule.from_fractions(3, 40, init_budget_ratio=1.1).init_budget == 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"warmup_frac": 1.0}, "warmup_frac"),
        ({"warmup_frac": -0.1}, "warmup_frac"),
        ({"final_frac": True}, "final_frac"),
        ({"init_budget_ratio": 0.9}, "init_budget_ratio"),
        ({"init_budget_ratio": math.nan}, "init_budget_ratio"),
        ({"init_budget_ratio": math.inf}, "init_budget_ratio"),
        ({"warmup_frac": 0.5, "final_frac": 0.5}, "warmup_steps"),
        ({"decay": "exp"}, "decay"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BudgetSchedule.from_fractions(1000, 100, **kwargs)


def test_total_steps_must_be_a_positive_int():
    with pytest.raises(ValueError, match="total_steps"):
        BudgetSchedule.from_fractions(1000, 0)
