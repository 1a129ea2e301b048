import copy
import warnings

import pytest
import torch
from torch import nn

from adarank.allocation import BudgetSchedule, RankController
from adarank.allocation.controller import CONTROLLER_DEFAULTS
from adarank.models.planted import build_planted_task
from adarank.modules import adapter_layers, add_adapters


def make_setup(seed=0, steps=60, budget=None, rank=6, lr=5e-3, grow=True):
    task = build_planted_task("6,3,1,0", 16, n_train=512, n_val=256, seed=seed)
    model = copy.deepcopy(task.model)
    layers = add_adapters(model, ["re:blocks\\.\\d+"], rank, seed=seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    budget = budget or task.planted_params
    sched = BudgetSchedule(
        final_budget=budget, total_steps=steps, warmup_steps=10, final_steps=10, interval=5
    )
    ctrl = RankController(layers, sched, optimizer=opt, grow=grow, seed=seed)
    return task, model, opt, ctrl


def run_steps(task, model, opt, ctrl, start, stop, micro=1, batch=64):
    gen = torch.Generator().manual_seed(1234)
    order = torch.randint(0, len(task.x_train), (stop + 1, batch), generator=gen)
    for step in range(start + 1, stop + 1):
        idx = order[step]
        for chunk in idx.chunk(micro):
            loss = task.loss(model(task.x_train[chunk]), task.y_train[chunk]) * len(chunk) / batch
            loss.backward()
        ctrl.observe()
        opt.step()
        ctrl.step(step)
        opt.zero_grad(set_to_none=True)


def test_final_allocation_meets_budget_and_optimizer_stays_consistent():
    task, model, opt, ctrl = make_setup()
    run_steps(task, model, opt, ctrl, 0, 60)
    budget = ctrl.schedule.final_budget
    cost = 2 * 16 + 1
    assert budget - cost < ctrl.live_params() <= budget
    assert ctrl.history and ctrl.history[-1].step == ctrl.schedule.final_start
    assert any(e.n_grown for e in ctrl.history) and any(e.n_pruned for e in ctrl.history)
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    for layer in adapter_layers(model).values():
        for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q):
            assert id(p) in params
            st = opt.state.get(p)
            if st:
                assert st["exp_avg"].shape == p.shape == st["exp_avg_sq"].shape


def test_optimizer_state_reindexed_on_prune_and_grow():
    torch.manual_seed(0)
    layer = add_adapters(nn.Sequential(nn.Linear(8, 8)), ["0"], 3)["0"]
    opt = torch.optim.Adam([layer.lora_P, layer.lora_lambda, layer.lora_Q], lr=0.1)
    layer(torch.randn(4, 8)).sum().backward()
    opt.step()
    before = opt.state[layer.lora_lambda]["exp_avg"].clone()
    from adarank.allocation import replace_parameter

    old = layer.lora_lambda
    keep = layer.prune([1])
    layer.grow(torch.randn(8, 2), torch.randn(2, 8))
    assert replace_parameter(opt, old, layer.lora_lambda, keep, 2, 0)
    after = opt.state[layer.lora_lambda]["exp_avg"]
    assert torch.equal(after[:2], before[[0, 2]]) and torch.equal(after[2:], torch.zeros(2))
    ids = [id(p) for p in opt.param_groups[0]["params"]]
    assert id(layer.lora_lambda) in ids and id(old) not in ids


def test_new_slots_inherit_the_mean_second_moment_and_take_lr_sized_steps():
    """Adam's step count t is kept across a resize, so a new slot with zero moments would move by
    (1-β1)/√((1-β2)/(1-β2ᵗ)) ≈ 2.9 lr on its first step at t = 2000; with the surviving slots'
    mean second moment it moves by ≈ (1-β1)·|g|/√v̄, a fraction of a surviving slot's step."""
    from adarank.allocation import replace_parameter

    def grown_step(second_moment):
        torch.manual_seed(0)
        layer = add_adapters(nn.Sequential(nn.Linear(8, 8)), ["0"], 3)["0"]
        opt = torch.optim.Adam([layer.lora_P, layer.lora_lambda, layer.lora_Q], lr=0.1)
        for _ in range(2000):  # late in a run: β2's bias correction is ≈ 1
            layer(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        v_old = opt.state[layer.lora_lambda]["exp_avg_sq"].clone()
        old = [layer.lora_P, layer.lora_lambda, layer.lora_Q]
        keep = layer.prune([1])
        layer.grow(torch.randn(8, 2), torch.randn(2, 8), torch.full((2,), 0.5))
        for o, new, dim in zip(old, (layer.lora_P, layer.lora_lambda, layer.lora_Q), (1, 0, 0)):
            assert replace_parameter(opt, o, new, keep, 2, dim, second_moment=second_moment)
        v = opt.state[layer.lora_lambda]["exp_avg_sq"].clone()
        assert torch.equal(v[:2], v_old[[0, 2]])
        before = layer.lora_lambda.detach().clone()
        layer(torch.randn(4, 8)).sum().backward()
        g = layer.lora_lambda.grad.clone()
        opt.step()
        return (layer.lora_lambda.detach() - before)[2:], g[2:], v_old[[0, 2]].mean(), v[2:]

    step, g, v_mean, v_new = grown_step("zero")
    assert torch.equal(v_new, torch.zeros(2))
    bias2 = 1 - 0.999**2001
    want = 0.1 * 0.1 * g.abs() / (1 - 0.9**2001) / ((0.001 * g**2 / bias2).sqrt() + 1e-8)
    torch.testing.assert_close(step.abs(), want)  # ≈ 2.9 × lr
    assert (step.abs() > 2.5 * 0.1).all()
    step, g, v_mean, v_new = grown_step("mean")
    torch.testing.assert_close(v_new, v_mean.expand(2))
    v_hat = (0.999 * v_mean + 0.001 * g**2) / bias2
    want = 0.1 * 0.1 * g.abs() / (1 - 0.9**2001) / (v_hat.sqrt() + 1e-8)
    torch.testing.assert_close(step.abs(), want)
    assert (step.abs() < 0.1).all()
    with pytest.raises(ValueError, match="second_moment='half'"):
        replace_parameter(
            torch.optim.Adam([nn.Parameter(torch.ones(1))]),
            None,
            None,
            None,
            0,
            0,
            second_moment="half",
        )


def test_retract_keeps_factors_orthonormal_and_delta_w_exact_through_allocation():
    """retract=True: after every controller.step the factors are orthonormal, the retraction
    itself leaves ΔW unchanged, and prunes/growth still run on the retracted triplets."""
    task, model, opt, ctrl = make_setup(steps=40)
    ctrl.retract = True
    layers = adapter_layers(model)
    gen = torch.Generator().manual_seed(7)
    drift = 0.0
    for step in range(1, 41):
        idx = torch.randint(0, len(task.x_train), (64,), generator=gen)
        task.loss(model(task.x_train[idx]), task.y_train[idx]).backward()
        ctrl.observe()
        opt.step()
        before = {n: la.delta_weight().detach().double() for n, la in layers.items()}
        sv = {n: la.delta_singular_values() for n, la in layers.items()}
        event = ctrl.step(step)
        opt.zero_grad(set_to_none=True)
        for n, la in layers.items():
            k = la.rank
            if k == 0:
                continue
            P, Q = la.lora_P.detach().double(), la.lora_Q.detach().double()
            eye = torch.eye(k, dtype=torch.float64)
            assert torch.allclose(P.T @ P, eye, atol=1e-5)
            assert torch.allclose(Q @ Q.T, eye, atol=1e-5)
            # λ are the singular values of ΔW (up to sign) once P and Q are orthonormal
            lam = (la.scaling * la.lora_lambda.detach().double().abs()).sort(descending=True)[0]
            assert torch.allclose(lam, la.delta_singular_values(), rtol=1e-4, atol=1e-6)
            if event is None:  # an allocation step also prunes and grows: ΔW changes there
                after = la.delta_weight().detach().double()
                drift = max(drift, float((after - before[n]).abs().max()))
                assert torch.allclose(lam, sv[n].sort(descending=True)[0], atol=1e-5)
    assert drift < 1e-5
    assert any(e.n_pruned for e in ctrl.history)
    with pytest.raises(TypeError, match="retract="):
        RankController(layers, None, retract="yes")


@pytest.mark.parametrize("retract", [False, True])
def test_gradient_accumulation_matches_large_batch(retract):
    """observe() over 4 micro-batches sees the statistics of one large batch: the same decisions,
    with or without the retraction. (With it, right after Adam's first step every |λ_i| ≈ lr:
    ΔW's singular values are tied and a plain SVD would let rounding pick the basis, hence which
    slot carries which triplet; the tie-aware retraction keeps each slot's own triplet.)"""
    results = []
    for micro in (1, 4):
        task, model, opt, ctrl = make_setup(steps=40)
        ctrl.retract = retract
        run_steps(task, model, opt, ctrl, 0, 40, micro=micro)
        results.append((ctrl, model))
    (c1, m1), (c4, m4) = results
    assert [e.ranks for e in c1.history] == [e.ranks for e in c4.history]
    for name in c1.layers:
        s1 = c1.scorer.scores(name, c1.layers[name])
        s4 = c4.scorer.scores(name, c4.layers[name])
        # 3e-3: a grown triplet's score starts from σ² − ν² (the noise floor, on by default), a
        # difference of two close numbers that magnifies the rounding of the two summations
        assert torch.allclose(s1, s4, rtol=3e-3, atol=1e-9)
    # with the retraction, the rank-6 layer's near-tied singular values turn rounding into factor
    # differences (measured: 1.3e-4 with the plain growth rule, 6.4e-4 with the noise floor,
    # whose σ² − ν² enters the grown triplets' state); the decisions above are identical
    atol = 1e-3 if retract else 1e-4
    for (n, a), (_, b) in zip(m1.state_dict().items(), m4.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=atol, msg=n)


def test_retraction_is_bit_for_bit_repeatable():
    """With the retraction a run is bit-for-bit repeatable."""

    def run(micro):
        task, model, opt, ctrl = make_setup(steps=40)
        ctrl.retract = True
        run_steps(task, model, opt, ctrl, 0, 40, micro=micro)
        return [e.ranks for e in ctrl.history], {
            k: v.clone() for k, v in model.state_dict().items()
        }

    (h4, s4), (h4b, s4b) = run(4), run(4)
    assert h4 == h4b and all(torch.equal(s4[k], s4b[k]) for k in s4)


def test_state_dict_roundtrip_gives_identical_decisions():
    task, model, opt, ctrl = make_setup()
    run_steps(task, model, opt, ctrl, 0, 60)
    ref_history = [e.to_dict() for e in ctrl.history]
    ref_model = model

    task, model, opt, ctrl = make_setup()
    run_steps(task, model, opt, ctrl, 0, 27)
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "ctrl": ctrl.state_dict()}
    )
    # fresh objects, resized to the saved ranks, then restored
    task, model2, opt2, ctrl2 = make_setup()
    from adarank.modules import resize_to

    resize_to(model2, saved["ctrl"]["ranks"])
    model2.load_state_dict(saved["model"])
    opt2 = torch.optim.Adam([p for p in model2.parameters() if p.requires_grad], lr=5e-3)
    opt2.load_state_dict(saved["opt"])
    ctrl2 = RankController(adapter_layers(model2), ctrl2.schedule, optimizer=opt2, seed=0)
    ctrl2.load_state_dict(saved["ctrl"])
    run_steps(task, model2, opt2, ctrl2, 27, 60)
    assert [e.to_dict() for e in ctrl2.history] == [
        {**e, "wall_s": e2["wall_s"]}
        for e, e2 in zip(ref_history, [x.to_dict() for x in ctrl2.history])
    ]
    for (n, a), (_, b) in zip(ref_model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n


def test_state_dict_rejects_other_model_or_budget():
    _, _, _, ctrl = make_setup()
    state = ctrl.state_dict()
    _, _, _, other = make_setup(budget=500)
    with pytest.raises(ValueError, match="final_budget"):
        other.load_state_dict(state)
    task = build_planted_task("2,1", 8, n_train=16, n_val=16)
    m = copy.deepcopy(task.model)
    layers = add_adapters(m, ["re:blocks\\.\\d+"], 1)
    sched = BudgetSchedule(final_budget=30, total_steps=60, warmup_steps=10, final_steps=10)
    with pytest.raises(ValueError, match="different model"):
        RankController(layers, sched).load_state_dict(state)


def test_pruned_direction_returns_through_growth():
    torch.manual_seed(0)
    task = build_planted_task("3", 16, n_train=1024, n_val=64, seed=0, noise_std=0.0)
    model = copy.deepcopy(task.model)
    layers = add_adapters(model, ["blocks.0"], 3, seed=0)
    layer = layers["blocks.0"]
    teacher = task.teacher[0].double()
    u, s, vh = torch.linalg.svd(teacher)
    with torch.no_grad():  # install the exact teacher, then delete its strongest triplet
        layer.lora_P.copy_(u[:, :3].float())
        layer.lora_lambda.copy_(s[:3].float())
        layer.lora_Q.copy_(vh[:3].float())
    layer.prune([0])
    sched = BudgetSchedule(
        final_budget=3 * 33,
        init_budget=3 * 33,
        total_steps=10,
        warmup_steps=0,
        final_steps=1,
        interval=1,
        grow_cooldown=0,
    )
    ctrl = RankController(layers, sched)
    loss = task.loss(model(task.x_train), task.y_train)
    loss.backward()
    ctrl.observe()
    event = ctrl.step(1)
    assert event.grown["blocks.0"] == 1 and layer.rank == 3
    new_p, new_q = layer.lora_P[:, -1].detach().double(), layer.lora_Q[-1].detach().double()
    assert abs(float(new_p @ u[:, 0])) > 0.99 and abs(float(new_q @ vh[0])) > 0.99


def test_none_and_nonfinite_gradients_warn_once_and_never_nan():
    task, model, opt, ctrl = make_setup()
    ctrl.scorer = type(ctrl.scorer).__mro__[0](0.85, 0.85)
    from adarank.allocation import make_scorer

    ctrl.scorer = make_scorer("sensitivity")
    with pytest.warns(RuntimeWarning, match="no gradient"):
        ctrl.observe()  # no backward yet: every grad is None
    layer = next(iter(ctrl.layers.values()))
    model(task.x_train[:8]).sum().backward()
    layer.lora_lambda.grad[0] = float("nan")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ctrl.observe()
        ctrl.observe()
    assert sum("non-finite" in str(w.message) for w in rec) == 1
    for name, la in ctrl.layers.items():
        assert torch.isfinite(ctrl.scorer.scores(name, la)).all()


def test_energy_score_equals_output_energy_of_each_triplet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    layers = add_adapters(model, ["0"], 3, scaling=2.0)
    layer = layers["0"]
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.tensor([1.0, -0.5, 2.0]))
        layer.lora_P.mul_(1.7)
    sched = BudgetSchedule(final_budget=40, total_steps=100)
    ctrl = RankController(layers, sched, beta1=0.0)
    x = torch.randn(50, 12)
    model(x)  # statistics only, no gradient: λ̂ = λ and the score is the current energy
    ctrl.observe()
    got = ctrl.scorer.scores("0", layer)
    for i in range(3):
        dw_i = 2.0 * layer.lora_lambda[i] * torch.outer(layer.lora_P[:, i], layer.lora_Q[i])
        ref = (x @ dw_i.T).pow(2).sum(1).mean().detach()
        assert float(got[i]) == pytest.approx(float(ref), rel=1e-5)


def test_step_without_observe_warns():
    task, model, opt, ctrl = make_setup()
    with pytest.warns(RuntimeWarning, match="observe"):
        ctrl.step(10)


def test_scorer_state_is_small():
    task, model, opt, ctrl = make_setup()
    run_steps(task, model, opt, ctrl, 0, 30)
    adapter_bytes = sum(
        p.numel() * 4 for la in ctrl.layers.values() for p in (la.lora_P, la.lora_lambda, la.lora_Q)
    )
    assert ctrl.state_memory_bytes() < 0.5 * adapter_bytes


def test_energy_score_predicts_the_gauss_newton_optimum_of_lambda():
    # squared loss on the layer output with a target that wants λ = a along (u, v):
    # the one-step Gauss-Newton λ̂ is exactly a, whatever the current λ
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    layer = add_adapters(model, ["0"], 1, scaling=1.5)["0"]
    a = 0.8
    with torch.no_grad():
        layer.lora_lambda.fill_(0.2)
    x = torch.randn(64, 12)
    u, v = layer.lora_P[:, 0].detach(), layer.lora_Q[0].detach()
    target = model[0].base_layer(x) + 1.5 * a * torch.outer(x @ v, u)
    ctrl = RankController({"0": layer}, BudgetSchedule(final_budget=40, total_steps=100), beta1=0.0)
    (0.5 * (model(x) - target).pow(2).sum(1).mean()).backward()
    ctrl.observe()
    m = float((x @ v).pow(2).mean())
    assert float(ctrl.scorer.state["0"]["a_hat"][0]) == pytest.approx(a, rel=1e-4)
    assert float(ctrl.scorer.scores("0", layer)[0]) == pytest.approx(1.5**2 * a**2 * m, rel=1e-4)


def test_energy_score_is_defined_for_lora_style_init():
    """P = 0, λ = 1: scores are finite (0 before P moves), and grow once P has a gradient step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    layer = add_adapters(model, ["0"], 3, factor_init="lora")["0"]
    assert torch.equal(layer.lora_P, torch.zeros(10, 3)) and torch.equal(
        layer.lora_lambda, torch.ones(3)
    )
    ctrl = RankController({"0": layer}, BudgetSchedule(final_budget=40, total_steps=100), beta1=0.0)
    x = torch.randn(32, 12)
    target = model[0].base_layer(x) + torch.randn(32, 10)
    (0.5 * (model(x) - target).pow(2).sum(1).mean()).backward()
    ctrl.observe()
    assert torch.equal(ctrl.scorer.scores("0", layer), torch.zeros(3, dtype=torch.float64))
    opt = torch.optim.SGD([layer.lora_P], lr=0.1)
    opt.step()
    layer.lora_lambda.grad = None
    model.zero_grad()
    (0.5 * (model(x) - target).pow(2).sum(1).mean()).backward()
    ctrl.observe()
    s = ctrl.scorer.scores("0", layer)
    assert torch.isfinite(s).all() and (s > 0).all()


@pytest.mark.parametrize("scorer", ["energy", "sensitivity"])
def test_vectorised_observe_equals_per_layer_updates(scorer):
    """observe() packs all layers into one buffer; the result must equal updating each layer
    on its own (unequal ranks, a rank-0 layer, a layer whose statistics are non-finite)."""
    from adarank.allocation import make_scorer

    task, model, opt, ctrl = make_setup(rank=5)
    ctrl.scorer = make_scorer(scorer)
    names = list(ctrl.layers)
    ctrl.layers[names[1]].prune([0, 3])
    ctrl.layers[names[3]].prune(range(5))
    ref = make_scorer(scorer)
    for step in range(3):
        model(task.x_train[:32]).pow(2).mean().backward()
        if step == 1:
            ctrl.layers[names[2]].lora_lambda.grad[1] = float("inf")
        expected = {}
        for name, layer in ctrl.layers.items():  # reference: one layer at a time, float64
            cap = ctrl.capture[name]
            z_sum, count = cap.z_sq_sum.double().clone(), cap.z_count
            stats = ref.slot_stats(layer) if layer.rank else {}
            stats = {k: v.double().clone() for k, v in (stats or {}).items()}
            ok = all(torch.isfinite(v).all() for v in (z_sum, *stats.values()))
            expected[name] = (z_sum / count if count else None, stats, ok)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ctrl.observe()
        for name, layer in ctrl.layers.items():
            z_mean, stats, ok = expected[name]
            if ok:
                ref.update(name, layer, z_mean, stats)
            else:
                ref._layer_state(name, layer.rank)
        opt.zero_grad(set_to_none=True)
    for name in names:
        got, want = ctrl.scorer.state[name], ref.state[name]
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-12)
    assert ctrl.scorer.state[names[2]]["seen"].tolist() == [2.0] * 5  # step 1 skipped
    assert ctrl.scorer.state[names[0]]["seen"].tolist() == [3.0] * 5


def test_without_retraction_adam_drifts_the_factors_and_retract_factors_restores_them():
    """retract=False (the plain parametrisation): Adam moves P and Q off the orthonormal set
    within a few steps; retract_factors() puts them back with ΔW unchanged."""
    task, model, opt, ctrl = make_setup(steps=40)
    assert ctrl.retract is CONTROLLER_DEFAULTS["retract"]
    ctrl.retract = False
    layers = adapter_layers(model)
    gen = torch.Generator().manual_seed(3)
    for _ in range(8):
        idx = torch.randint(0, len(task.x_train), (64,), generator=gen)
        task.loss(model(task.x_train[idx]), task.y_train[idx]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def off(la):
        P, Q = la.lora_P.detach().double(), la.lora_Q.detach().double()
        eye = torch.eye(la.rank, dtype=torch.float64)
        return max(float((P.T @ P - eye).abs().max()), float((Q @ Q.T - eye).abs().max()))

    assert max(off(la) for la in layers.values()) > 1e-3
    before = {n: la.delta_weight().detach().double() for n, la in layers.items()}
    ctrl.retract_factors()
    assert max(off(la) for la in layers.values()) < 1e-5
    for n, la in layers.items():
        assert torch.allclose(la.delta_weight().detach().double(), before[n], atol=1e-6)


def test_max_delta_ratio_bounds_every_layer_against_its_base_norm():
    """max_delta_ratio = c: after every step each layer's ‖ΔW‖₂ ≤ c·‖W0‖₂ (dense SVD check);
    without it the same run goes past the bound; bad values are rejected before training."""
    peaks = {}
    for ratio in (None, 0.05):
        task, model, opt, ctrl = make_setup(steps=40, lr=5e-2)
        ctrl.retract = True
        ctrl.max_delta_ratio = ratio
        layers = adapter_layers(model)
        base = {
            n: float(torch.linalg.matrix_norm(la.base_weight.detach().double(), ord=2))
            for n, la in layers.items()
        }
        peak = 0.0
        for step in range(1, 21):
            run_steps(task, model, opt, ctrl, step - 1, step)
            for n, la in layers.items():
                if la.rank:
                    dw = torch.linalg.matrix_norm(la.delta_weight().detach().double(), ord=2)
                    peak = max(peak, float(dw) / base[n])
        peaks[ratio] = peak
    assert peaks[0.05] <= 0.05 * (1 + 1e-5) and peaks[None] > 0.1, peaks
    for bad in (0, -1.0, True):
        with pytest.raises(ValueError, match="max_delta_ratio="):
            RankController(adapter_layers(model), None, max_delta_ratio=bad)
