"""AdaRankModule: construction, allocation on/off, regulariser, progress bar, checkpoints."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _tiny import fit_tiny, make_model

from adarank.lightning import AdaRankModule
from adarank.lightning.checkpointing import check_strategy
from adarank.modules import adapter_layers, count_parameters


def test_allocation_changes_ranks_and_keeps_budget():
    module, trainer = fit_tiny(steps=20, val=True)
    history = module.controller.history
    assert history and sum(e.n_pruned + e.n_grown for e in history) > 0
    assert module.controller.live_params() <= module.param_budget
    ranks = {n: la.rank for n, la in adapter_layers(module.model).items()}
    assert ranks == history[-1].ranks
    # the optimizer holds exactly the live adapter tensors (old ones were swapped out)
    opt_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    live = {id(p) for la in adapter_layers(module.model).values() for p in la.parameters()}
    assert {i for i in live if i in opt_ids} == {
        id(p)
        for la in adapter_layers(module.model).values()
        for p in (la.lora_P, la.lora_lambda, la.lora_Q)
    }
    pbar = trainer.progress_bar_metrics
    assert pbar["live_params"] == module.controller.live_params()
    assert pbar["budget"] == module.schedule.budget(trainer.global_step)
    assert {"val/loss", "val/mse"} <= set(trainer.callback_metrics)


def test_allocation_off_keeps_ranks_fixed():
    module, _ = fit_tiny(budget=None, steps=6)
    assert module.controller is None and module.param_budget is None
    assert {la.rank for la in adapter_layers(module.model).values()} == {2}


def test_orth_reg_is_the_orthogonality_penalty():
    module, trainer = fit_tiny(budget=None, steps=3, orth_reg=0.1)
    reg = module.regularizer()
    manual = 0.0
    for la in adapter_layers(module.model).values():
        P, Q = la.lora_P.detach(), la.lora_Q.detach()
        eye = torch.eye(la.rank)
        manual += torch.linalg.matrix_norm(P.T @ P - eye) ** 2
        manual += torch.linalg.matrix_norm(Q @ Q.T - eye) ** 2
    assert reg.item() == pytest.approx(0.1 * float(manual), rel=1e-5)
    assert reg.requires_grad
    assert "train/orth_reg" in trainer.logged_metrics


def test_retract_reaches_the_controller_and_keeps_factors_orthonormal():
    def off(module):  # largest deviation of PᵀP and QQᵀ from I over the layers
        return max(
            max(
                float((la.lora_P.T @ la.lora_P - torch.eye(la.rank)).abs().max().detach()),
                float((la.lora_Q @ la.lora_Q.T - torch.eye(la.rank)).abs().max().detach()),
            )
            for la in adapter_layers(module.model).values()
            if la.rank
        )

    module, _ = fit_tiny(steps=8)  # on by default
    assert module.controller.retract is True and off(module) < 1e-5
    module, _ = fit_tiny(steps=8, retract=False)  # off: Adam drifts the factors
    assert module.controller.retract is False and off(module) > 1e-3
    with pytest.raises(TypeError, match="retract="):
        AdaRankModule(make_model(), "regression", budget=100, retract=1)


def test_percentage_budget_resolves_against_base_params():
    model = make_model()
    module = AdaRankModule(model, "regression", budget="25%")
    assert module.base_params == count_parameters(model)["base"] == 4 * 64
    assert module.param_budget == 64


def test_constructor_errors():
    with pytest.raises(ValueError, match="no adapter layers"):
        AdaRankModule(torch.nn.Linear(2, 2), "regression")
    with pytest.raises(ValueError, match="task='nope'"):
        AdaRankModule(make_model(), "nope")
    with pytest.raises(ValueError, match="optimizer='lion'"):
        AdaRankModule(make_model(), "regression", optimizer="lion")
    with pytest.raises(ValueError, match="warmup_frac"):
        AdaRankModule(make_model(), "regression", warmup_frac=1.5)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        AdaRankModule("model", "regression")


def test_sharded_strategies_are_rejected_for_allocation():
    fake = SimpleNamespace(strategy=object())
    with pytest.raises(ValueError, match="not supported with object"):
        check_strategy(fake, allocation=True)
    check_strategy(fake, allocation=False)  # fixed ranks: any strategy


def _checkpoint(tmp_path):
    module, trainer = fit_tiny(steps=12)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    return module, torch.load(path, weights_only=True)


def test_checkpoint_restores_ranks_and_controller(tmp_path):
    module, ckpt = _checkpoint(tmp_path)
    saved_ranks = module.controller.ranks()
    assert saved_ranks != {n: 2 for n in saved_ranks}  # ranks moved away from the init
    fresh = AdaRankModule(make_model(), "regression", budget=module.param_budget)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])  # shapes now match the saved adapter
    assert {n: la.rank for n, la in adapter_layers(fresh.model).items()} == saved_ranks
    for (n, a), b in zip(module.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    assert fresh._pending_controller_state["history"][-1]["ranks"] == saved_ranks


def test_checkpoint_mismatch_errors(tmp_path):
    module, ckpt = _checkpoint(tmp_path)
    other_budget = AdaRankModule(make_model(), "regression", budget=module.param_budget + 17)
    with pytest.raises(ValueError, match="param_budget"):
        other_budget.on_load_checkpoint(ckpt)
    other_model = AdaRankModule(make_model(k=3), "regression", budget=module.param_budget)
    with pytest.raises(ValueError, match="not in the model"):
        other_model.on_load_checkpoint(ckpt)
    wider = AdaRankModule(make_model(d=6), "regression", budget=module.param_budget)
    with pytest.raises(ValueError, match="d_out, d_in"):
        wider.on_load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="not written by adarank"):
        other_budget.on_load_checkpoint({"state_dict": {}})
