"""Optimizer parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adarank.lightning.optim import build_optimizer, linear_warmup_decay, param_groups
from adarank.modules import add_adapters


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_param_groups_split_adapter_lambda_and_head(seed):
    model = Net()
    layers = add_adapters(model, "body", init_rank=2, modules_to_save="head", seed=0)
    opt = build_optimizer(model, "adamw", lr=1e-3, head_lr=5e-3, weight_decay=0.01)
    by_name = {g["name"]: g for g in opt.param_groups}
    layer = layers["body"]
    assert {id(p) for p in by_name["adapter"]["params"]} == {id(layer.lora_P), id(layer.lora_Q)}
    assert [id(p) for p in by_name["adapter_lambda"]["params"]] == [id(layer.lora_lambda)]
    assert by_name["adapter_lambda"]["weight_decay"] == 0.0
    assert [id(p) for p in by_name["head"]["params"]] == [id(model.head.weight)]
    assert [id(p) for p in by_name["head_no_decay"]["params"]] == [id(model.head.bias)]
    assert by_name["head"]["lr"] == 5e-3 and by_name["adapter"]["lr"] == 1e-3
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in opt.param_groups for p in g["params"]}
    assert isinstance(build_optimizer(model, "sgd", lr=0.1), torch.optim.SGD)


def test_head_lr_defaults_to_lr(seed):
    model = Net()
    add_adapters(model, "body", init_rank=1, modules_to_save="head")
    assert {g["lr"] for g in param_groups(model, lr=2e-4)} == {2e-4}


def test_optimizer_errors(seed):
    model = Net()
    with pytest.raises(ValueError, match="no trainable"):
        for p in model.parameters():
            p.requires_grad_(False)
        build_optimizer(model, lr=1e-3)
    add_adapters(model, "body", init_rank=1)
    with pytest.raises(ValueError, match="optimizer='lion'"):
        build_optimizer(model, "lion", lr=1e-3)
    with pytest.raises(ValueError, match="lr=-1"):
        build_optimizer(model, lr=-1)


def test_linear_warmup_decay_matches_closed_form():
    total, ratio = 100, 0.06
    warm = math.ceil(ratio * total)
    values = [linear_warmup_decay(s, total, ratio) for s in range(total + 1)]
    assert values[0] == pytest.approx(1 / (warm + 1))
    assert max(values) == pytest.approx(1.0) and values.index(1.0) == warm
    assert values[-1] == 0.0
    mid = 50
    assert values[mid] == pytest.approx((total - mid) / (total - warm))
    assert all(b <= a for a, b in zip(values[warm:], values[warm + 1 :]))
    with pytest.raises(ValueError, match="warmup_ratio"):
        linear_warmup_decay(0, 10, 1.5)


@pytest.mark.parametrize("lr", [1e-3, 1e-2, 3e-2])
def test_lambda_weight_decay_bounds_the_singular_values_whatever_the_lr(lr, seed):
    """With decoupled decay on λ alone, a gradient that keeps pushing λ up (here a loss
    -Σ s·λ) leaves |λ| at the fixed point of λ ← λ - lr(1 + wd·λ), i.e. 1/wd, for every
    learning rate; without it λ grows by ≈ lr per step. P, Q and the head are not decayed."""
    wd, steps = 16.0, 600
    for decay in (wd, 0.0):
        torch.manual_seed(0)
        model = Net()
        layers = add_adapters(model, "body", init_rank=2, modules_to_save="head", seed=0)
        layer = layers["body"]
        opt = build_optimizer(model, lr=lr, weight_decay=0.0, lambda_weight_decay=decay)
        groups = {g["name"]: g["weight_decay"] for g in opt.param_groups}
        assert groups == {
            "adapter": 0.0,
            "adapter_lambda": decay,
            "head": 0.0,
            "head_no_decay": 0.0,
        }
        P0 = layer.lora_P.detach().clone()
        for _ in range(steps):
            opt.zero_grad()
            (-(layer.scaling * layer.lora_lambda).sum()).backward()
            opt.step()
        lam = layer.lora_lambda.detach()
        if decay:
            # the fixed point of the AdamW update with a unit normalised step: λ* = 1/wd
            assert torch.allclose(lam, torch.full_like(lam, 1 / wd), rtol=0.02)
        else:
            assert torch.allclose(lam, torch.full_like(lam, lr * steps), rtol=0.02)
        assert torch.equal(layer.lora_P.detach(), P0)  # no gradient and no decay on P


def test_lambda_weight_decay_errors(seed):
    model = Net()
    add_adapters(model, "body", init_rank=1)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="lambda_weight_decay="):
            build_optimizer(model, lr=1e-3, lambda_weight_decay=bad)
