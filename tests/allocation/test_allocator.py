import itertools

import pytest
import torch

from adarank.allocation import allocate


def brute_force(scores, costs, budget, hi):
    best_val = -1.0
    names = sorted(scores)
    items = [(n, i) for n in names for i in range(len(scores[n]))]
    for mask in itertools.product([0, 1], repeat=len(items)):
        chosen = [it for it, m in zip(items, mask) if m]
        cost = sum(costs[n] for n, _ in chosen)
        counts = {n: sum(1 for m, _ in chosen if m == n) for n in names}
        if cost > budget or any(counts[n] > hi for n in names):
            continue
        val = sum(float(scores[n][i]) for n, i in chosen)
        if val > best_val:
            best_val = val
    return best_val


def test_respects_budget_and_fills_within_one_triplet():
    torch.manual_seed(0)
    scores = {f"l{i}": torch.rand(12) for i in range(5)}
    costs = {"l0": 129, "l1": 257, "l2": 65, "l3": 129, "l4": 193}
    for budget in (0, 64, 500, 1234, 3000, 5000):
        plan = allocate(scores, costs, budget)
        used = sum(plan.rank(n) * costs[n] for n in scores)
        assert used == plan.params <= budget
        total = sum(12 * c for c in costs.values())
        if budget < total:
            assert budget - used < max(costs.values())  # within one triplet of the budget


def test_prefers_cheap_layers_when_score_per_param_ties():
    scores = {"big": torch.tensor([2.0, 2.0]), "small": torch.tensor([1.0, 1.0])}
    costs = {"big": 200, "small": 100}  # equal score per parameter
    plan = allocate(scores, costs, 300)
    assert (plan.rank("small"), plan.rank("big")) == (2, 0)
    plan = allocate(scores, costs, 100)
    assert plan.rank("small") == 1 and plan.rank("big") == 0


def test_cost_aware_beats_rank_counting():
    # one expensive layer with a slightly higher raw score per triplet loses to cheap layers
    scores = {"wide": torch.tensor([1.1]), "a": torch.tensor([1.0]), "b": torch.tensor([1.0])}
    costs = {"wide": 1000, "a": 500, "b": 500}
    plan = allocate(scores, costs, 1000)
    assert (plan.rank("wide"), plan.rank("a"), plan.rank("b")) == (0, 1, 1)


def test_matches_brute_force_on_small_uniform_cost_problems():
    torch.manual_seed(1)
    for _ in range(5):
        scores = {n: torch.rand(3) for n in "abc"}
        costs = {n: 10 for n in "abc"}
        plan = allocate(scores, costs, 60)
        val = sum(float(scores[n][plan.selected[n]].sum()) for n in scores)
        assert val == pytest.approx(brute_force(scores, costs, 60, 3))


def test_bounds_forced_and_determinism():
    scores = {"a": torch.tensor([5.0, 4.0, 3.0]), "b": torch.tensor([0.1, 0.0, 0.0])}
    costs = {"a": 10, "b": 10}
    plan = allocate(scores, costs, 30, min_rank={"b": 1}, max_rank={"a": 2})
    assert plan.rank("a") == 2 and plan.rank("b") == 1
    forced = {"a": torch.tensor([False, False, False]), "b": torch.tensor([False, False, True])}
    plan = allocate(scores, costs, 20, forced=forced)
    assert 2 in plan.selected["b"].tolist() and plan.selected["a"].tolist() == [0]
    ties = {"x": torch.ones(4), "y": torch.ones(4)}
    p1 = allocate(ties, {"x": 5, "y": 5}, 20)
    p2 = allocate(dict(reversed(list(ties.items()))), {"x": 5, "y": 5}, 20)
    assert {k: v.tolist() for k, v in p1.selected.items()} == {
        k: v.tolist() for k, v in p2.selected.items()
    }
    assert p1.selected["x"].tolist() == [0, 1, 2, 3]
    nan_scores = {"a": torch.tensor([float("nan"), 1.0])}
    assert allocate(nan_scores, {"a": 1}, 1).selected["a"].tolist() == [1]
    with pytest.raises(ValueError, match="min_rank"):
        allocate(scores, costs, 30, min_rank=3, max_rank=2)
