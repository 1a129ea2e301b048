import pytest

from adarank.allocation import BudgetSchedule, resolve_budget


def test_resolve_budget_forms():
    assert resolve_budget(150000, 10**7) == 150000
    assert resolve_budget("150k", 10**7) == 150000
    assert resolve_budget("1.5M", 10**9) == 1_500_000
    assert resolve_budget("0.5%", 22_700_000) == 113_500
    for bad in ("abc", "0%", "150%", "-5", 0, "", "%"):
        with pytest.raises(ValueError, match="budget"):
            resolve_budget(bad, 1000)
    with pytest.raises(TypeError):
        resolve_budget(True, 1000)


def test_cubic_schedule_values():
    s = BudgetSchedule(
        final_budget=1000, total_steps=100, warmup_steps=10, final_steps=20, interval=5
    )
    assert s.init_budget == 1500
    assert s.budget(0) == s.budget(9) == 1500
    # decay phase t in [10, 80): b = 1000 + 500 (1 - (t-10)/70)^3
    for t in (10, 30, 45, 79):
        assert s.budget(t) == int(1000 + 500 * (1 - (t - 10) / 70) ** 3)
    assert s.budget(80) == s.budget(100) == 1000
    assert s.phase(5) == "warmup" and s.phase(50) == "decay" and s.phase(80) == "final"
    steps = s.allocation_steps()
    assert steps[0] == 10 and steps[-1] == 80 and all(t % 5 == 0 for t in steps)
    assert all(not s.is_allocation_step(t) for t in range(81, 101))


def test_linear_and_constant():
    lin = BudgetSchedule(
        final_budget=100,
        total_steps=100,
        init_budget=200,
        warmup_steps=0,
        final_steps=50,
        decay="linear",
    )
    assert lin.budget(25) == 150
    const = BudgetSchedule(final_budget=100, total_steps=100, decay="constant")
    assert {const.budget(t) for t in range(101)} == {100}


def test_growth_stops_before_final_phase():
    s = BudgetSchedule(
        final_budget=100, total_steps=1000, warmup_steps=100, final_steps=200, interval=10
    )
    assert s.grow_cooldown == max(20, 70)
    assert s.allows_growth(100) and s.allows_growth(729)
    assert not s.allows_growth(730) and not s.allows_growth(800) and not s.allows_growth(50)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(final_budget=100, total_steps=100, warmup_steps=50, final_steps=50), "warmup_steps"),
        (dict(final_budget=100, total_steps=0), "total_steps"),
        (dict(final_budget=0, total_steps=10), "final_budget"),
        (dict(final_budget=100, total_steps=100, decay="exp"), "decay"),
        (dict(final_budget=100, total_steps=100, init_budget=50), "init_budget"),
        (dict(final_budget=100, total_steps=100, interval=0), "interval"),
        (dict(final_budget=100, total_steps=100, min_budget=500), "min_rank"),
        (dict(final_budget=100, total_steps=100, max_budget=120), "max_rank"),
        (dict(final_budget=100, total_steps=100, max_budget=90), "final budget 100"),
    ],
)
def test_bad_schedules_explain(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BudgetSchedule(**kwargs)
