"""Calibration hooks vs statistics computed directly on a plain (adapter-free) model."""

from __future__ import annotations

import pytest
import torch
from conftest import TARGETS, make_batches, tiny_bert, with_adapters
from torch import nn

from adarank.allocation import RankController
from adarank.allocation.capture import installed
from adarank.init import calibrate
from adarank.modules import adapter_layers, match_name


def _targets(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(match_name(n, p) for p in TARGETS)
    }


def reference_inputs(batches) -> dict[str, torch.Tensor]:
    """Rows of each target layer's input (padding dropped), from a model without adapters."""
    model = tiny_bert(0)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in _targets(model)}
    current = {}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().double()
            m = current["mask"]
            rows[name].append(x[m] if x.shape[:-1] == m.shape else x.reshape(-1, x.shape[-1]))

        return fn

    for n, m in _targets(model).items():
        m.register_forward_pre_hook(hook(n))
    with torch.no_grad():
        for b in batches:
            current["mask"] = b["attention_mask"].bool()
            model(**b)
    return {n: torch.cat(v) for n, v in rows.items()}


def reference_gradients(batches) -> dict[str, torch.Tensor]:
    """Σ over batches of ∂loss/∂W for each target weight (autograd on a plain model)."""
    model = tiny_bert(0)
    layers = _targets(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in layers.values():
        m.weight.requires_grad_(True)
    for b in batches:
        model(**b).loss.backward()
    return {n: m.weight.grad.double() for n, m in layers.items()}


def test_covariance_matches_direct_computation(batches):
    model = with_adapters()
    result = calibrate(model, batches, num_batches=4)
    assert result.num_batches == 4
    ref = reference_inputs(batches[:4])
    assert set(result.covariances) == set(ref)
    for name, x in ref.items():
        acc = result.covariances[name]
        assert acc.count == x.shape[0] == 4 * (4 * 10 - 5)  # padding dropped
        torch.testing.assert_close(acc.second_moment(), x.T @ x / x.shape[0], rtol=1e-9, atol=1e-9)


def test_gradient_matches_autograd_full_weight_gradient(batches):
    model = with_adapters()
    head = model.classifier.weight
    head.grad = torch.ones_like(head)
    training = {n: m.training for n, m in model.named_modules()}
    result = calibrate(model, batches, num_batches=3, covariance=False, gradient=True)
    ref = reference_gradients(batches[:3])
    for name, g in ref.items():
        torch.testing.assert_close(result.gradients[name], g, rtol=1e-4, atol=1e-6)
    # the pass leaves no trace: gradients and modes restored, its capture hooks removed
    assert torch.equal(head.grad, torch.ones_like(head))
    assert {n: m.training for n, m in model.named_modules()} == training
    for layer in adapter_layers(model).values():
        assert installed(layer) == []
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules())


def test_gradient_pass_leaves_a_controllers_statistics_alone(batches):
    """A controller's capture on the same layers records nothing during calibration and
    records again afterwards (its statistics stay those of training)."""
    model = with_adapters()
    ctrl = RankController(adapter_layers(model), None)
    calibrate(model, batches, num_batches=2, covariance=False, gradient=True)
    assert all(cap.z_count == 0 for cap in ctrl.capture.values())
    assert all(installed(la) == [ctrl.capture[n]] for n, la in adapter_layers(model).items())
    ctrl.close()


def test_token_subsampling_bounds_rows_and_is_seeded(batches):
    model = with_adapters()
    a = calibrate(model, batches, num_batches=2, max_tokens_per_batch=7, seed=3)
    b = calibrate(model, batches, num_batches=2, max_tokens_per_batch=7, seed=3)
    for name, acc in a.covariances.items():
        assert acc.count == 14
        torch.testing.assert_close(acc.m2, b.covariances[name].m2, rtol=0, atol=0)


def test_wide_layers_use_the_sketch():
    model = with_adapters()
    result = calibrate(model, make_batches(3), sketch_threshold=40, sketch_rank=8)
    kinds = {n: a.kind for n, a in result.covariances.items()}
    assert kinds["bert.encoder.layer.0.output.dense"] == "sketch"  # d_in = 48 > 40
    assert kinds["bert.encoder.layer.0.attention.self.query"] == "dense"  # d_in = 32


def test_bad_arguments_are_named():
    model = with_adapters()
    with pytest.raises(ValueError, match="num_batches=0"):
        calibrate(model, make_batches(1), num_batches=0)
    with pytest.raises(ValueError, match="no batches"):
        calibrate(model, [])
    with pytest.raises(TypeError, match="scalar loss"):
        calibrate(model, [torch.randint(1, 97, (2, 5))], gradient=True, covariance=False)
    with pytest.raises(ValueError, match="no adapter layers"):
        calibrate(tiny_bert(), make_batches(1))
