"""The controller's own guarantees, checked inside real ``RankController`` runs.

1. Function preservation: a growth event leaves the model's outputs unchanged (new triplets enter
   with λ = 0), and a prune changes them by exactly the pruned triplets' terms — compared on a
   fixed probe batch with a copy of the pre-step model in which only those triplets are zeroed.
2. Protection: a triplet grown at one allocation is not pruned at the next one (within
   ``protect_rounds`` rounds, before the final allocation), even when its score is the lowest.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adarank.allocation import BudgetSchedule, RankController
from adarank.allocation.importance import EnergyScorer
from adarank.modules import adapter_layers, add_adapters

D_IN, HIDDEN, D_OUT = 12, 16, 6
TRIPLET_COSTS = (D_IN + HIDDEN + 1, 2 * HIDDEN + 1, HIDDEN + D_OUT + 1)


def make_mlp(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A 3-layer GELU MLP with adapters (rank 1) and a teacher whose weights differ by a
    low-rank update per layer (so the gradient keeps proposing new directions)."""
    torch.manual_seed(seed)
    base = nn.Sequential(
        nn.Linear(D_IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, D_OUT),
    )  # fmt: skip
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for m in teacher:
            if isinstance(m, nn.Linear):
                d_out, d_in = m.weight.shape
                m.weight.add_(torch.randn(d_out, 3) @ torch.randn(3, d_in) / d_in**0.5)
    add_adapters(base, ["0", "2", "4"], 1, seed=seed)
    return base, teacher.eval()


def run(model, teacher, ctrl, opt, steps, on_step, seed=0):
    """Train with the controller; ``on_step(step, before_step_model)`` after each ctrl.step."""
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        x = torch.randn(32, D_IN, generator=g)
        with torch.no_grad():
            y = teacher(x)
        loss = 0.5 * (model(x) - y).pow(2).sum(1).mean()
        loss.backward()
        ctrl.observe()
        opt.step()
        before = copy.deepcopy(model)
        event = ctrl.step(step)
        opt.zero_grad(set_to_none=True)
        on_step(step, before, event)


def kept_slots(old, new, n_grown: int) -> list[int]:
    """Old slot index of each surviving triplet (matched by its exact P column, λ and Q row)."""
    out = []
    for j in range(new.rank - n_grown):
        hits = [
            i
            for i in range(old.rank)
            if torch.equal(old.lora_Q[i], new.lora_Q[j])
            and torch.equal(old.lora_P[:, i], new.lora_P[:, j])
            and torch.equal(old.lora_lambda[i], new.lora_lambda[j])
        ]
        assert len(hits) == 1, "surviving triplets must be kept unchanged"
        out.append(hits[0])
    assert out == sorted(out), "survivors keep their order"
    return out


def schedule(total: int = 60) -> BudgetSchedule:
    return BudgetSchedule(
        final_budget=4 * sum(TRIPLET_COSTS),
        init_budget=9 * sum(TRIPLET_COSTS),
        total_steps=total,
        warmup_steps=3,
        final_steps=6,
        interval=3,
        grow_cooldown=6,
    )


@pytest.mark.parametrize("retract", [False, True])
def test_growth_keeps_outputs_and_prunes_remove_exactly_their_terms(retract):
    """With the retraction (which re-diagonalises every triplet at each step, keeping ΔW) the
    survivors are not bit-for-bit the old triplets, so there the prune terms are not matched
    slot by slot; growth must still leave the outputs unchanged."""
    model, teacher = make_mlp()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl = RankController(adapter_layers(model), schedule(), optimizer=opt, retract=retract)
    probe = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(99))
    seen = {"grow": 0, "grow_only": 0, "prune": 0, "moved": 0.0}

    def check(step, before, event):
        if event is None:
            return
        if retract:
            for name, new in adapter_layers(model).items():
                g = event.grown[name]
                assert torch.equal(new.lora_lambda[new.rank - g :].detach(), torch.zeros(g))
        with torch.no_grad():
            if retract:
                out_before, out_after = before(probe), model(probe)
                if event.n_grown and not event.n_pruned:
                    torch.testing.assert_close(out_after, out_before, rtol=0, atol=1e-5)
        if retract:
            seen["grow"] += event.n_grown > 0
            seen["prune"] += event.n_pruned > 0
            seen["grow_only"] += bool(event.n_grown and not event.n_pruned)
            seen["moved"] = 1.0
            return
        with torch.no_grad():
            out_before, out_after = before(probe), model(probe)
            reference = copy.deepcopy(before)  # the pre-step model minus the pruned triplets
            old_layers, new_layers = adapter_layers(reference), adapter_layers(model)
            for name, new in new_layers.items():
                keep = kept_slots(old_layers[name], new, event.grown[name])
                drop = sorted(set(range(old_layers[name].rank)) - set(keep))
                assert len(drop) == event.pruned[name]
                old_layers[name].lora_lambda[drop] = 0.0
                if event.grown[name]:  # new triplets start at λ = 0
                    assert torch.equal(
                        new.lora_lambda[-event.grown[name] :], torch.zeros(event.grown[name])
                    )
            # to float32 rounding: outputs are O(10), a few ulps differ by summation order
            torch.testing.assert_close(out_after, reference(probe), rtol=1e-6, atol=1e-6)
        seen["grow"] += event.n_grown > 0
        seen["prune"] += event.n_pruned > 0
        if event.n_grown and not event.n_pruned:
            seen["grow_only"] += 1
            torch.testing.assert_close(out_after, out_before, rtol=1e-6, atol=1e-6)
        if event.n_pruned:
            seen["moved"] = max(seen["moved"], float((out_after - out_before).abs().max()))

    run(model, teacher, ctrl, opt, 60, check)
    # the run exercised what it checks: several growths (some alone), prunes that mattered
    assert seen["grow"] >= 3 and seen["grow_only"] >= 1 and seen["prune"] >= 3, seen
    assert seen["moved"] > 1e-3, seen


class YoungestLowest(EnergyScorer):
    """The energy scorer, except that triplets grown at the latest allocation score 0 — below
    every other triplet and every candidate — until the next allocation."""

    def __init__(self) -> None:
        super().__init__()
        self.young: dict[str, torch.Tensor] = {}

    def scores(self, name, layer):
        s = super().scores(name, layer)
        young = self.young.get(name)
        if young is not None and young.numel() == s.numel():
            s = torch.where(young, torch.zeros_like(s), s)
        return s


def test_new_triplets_survive_the_next_allocation_even_with_the_lowest_score():
    model, teacher = make_mlp(1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scorer = YoungestLowest()
    sched = schedule()
    # the allocation's guarantee, on triplets the retraction does not re-diagonalise
    ctrl = RankController(adapter_layers(model), sched, scorer=scorer, optimizer=opt, retract=False)
    born: dict[str, tuple[int, list[int]]] = {}  # layer → (step, slots grown then)
    stats = {"protected_rounds": 0, "overruled": 0}

    def check(step, before, event):
        if event is None:
            return
        old_layers, layers = adapter_layers(before), adapter_layers(model)
        for name, (s, slots) in born.items():
            if step - s > ctrl.protect_rounds * sched.interval or step == sched.final_start:
                continue  # the documented limits of the protection
            keep = kept_slots(old_layers[name], layers[name], event.grown[name])
            assert set(slots) <= set(keep), f"step {step}: {name} pruned a protected triplet"
            stats["protected_rounds"] += 1
            stats["overruled"] += event.n_pruned > 0  # pruning happened, scored triplets went
        born.clear()
        scorer.young = {}
        for name, layer in layers.items():
            g = event.grown[name]
            if g:
                born[name] = (step, list(range(layer.rank - g, layer.rank)))
                scorer.young[name] = torch.arange(layer.rank) >= layer.rank - g

    run(model, teacher, ctrl, opt, 60, check)
    assert stats["protected_rounds"] >= 3 and stats["overruled"] >= 1, stats
