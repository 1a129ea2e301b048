"""Each init strategy: output identity at init, what it puts in P/λ/Q, training + merge + export."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batches, tiny_bert, with_adapters
from test_calibration import reference_gradients, reference_inputs

from adarank import adapter_layers, load_adapter, merge_adapters, save_adapter, unmerge_adapters
from adarank.init import initialize_adapters

CASES = [
    ("lora", {}),
    ("svd", {}),
    ("svd", {"components": "bottom"}),
    ("covariance", {}),
    ("covariance", {"covariance_form": "whitened", "shrinkage": "oas"}),
    ("covariance", {"components": "bottom", "shrinkage": "ledoit_wolf"}),
    ("covariance", {"sketch_threshold": 40, "sketch_rank": 8}),  # FFN output via the sketch
    ("activations", {}),
    ("gradient", {}),
]


def logits(model, batches) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]
        )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize(("strategy", "kwargs"), CASES)
def test_output_at_init_equals_base_model(strategy, kwargs):
    batches = make_batches(4)
    base = logits(tiny_bert(0), batches)
    model = with_adapters()
    report = initialize_adapters(model, strategy, batches, **kwargs)
    assert rel_err(logits(model, batches), base) <= 1e-5
    assert report.ranks == {n: 4 for n in adapter_layers(model)}
    layers = adapter_layers(model).values()
    if strategy in ("svd", "covariance"):  # the offset form really moved weight into ΔW
        assert all(ly.shift_P.shape[1] == 4 and ly.lora_lambda.abs().min() > 0 for ly in layers)
    if strategy != "lora":
        assert report.calibration_seconds > 0 or strategy == "svd"


def test_svd_takes_the_principal_triplets_of_w():
    model = with_adapters()
    W = {n: ly.base_weight.detach().double().clone() for n, ly in adapter_layers(model).items()}
    initialize_adapters(model, "svd")
    for name, ly in adapter_layers(model).items():
        U, S, Vh = torch.linalg.svd(W[name])
        best = (U[:, :4] * S[:4]) @ Vh[:4]
        torch.testing.assert_close(ly.delta_weight().double(), best, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("form", "power"), [("corda", 1.0), ("whitened", 0.5)])
def test_covariance_init_is_the_data_weighted_truncation(form, power):
    """ΔW C^p equals the best rank-r approximation of W C^p (C damped, computed directly)."""
    batches = make_batches(4)
    inputs = reference_inputs(batches)
    model = with_adapters()
    W = {n: ly.base_weight.detach().double().clone() for n, ly in adapter_layers(model).items()}
    initialize_adapters(model, "covariance", batches, covariance_form=form, damping=0.1)
    for name, ly in adapter_layers(model).items():
        x = inputs[name]
        C = x.T @ x / x.shape[0]
        C = C + 0.1 * torch.trace(C) / C.shape[0] * torch.eye(C.shape[0], dtype=C.dtype)
        e, V = torch.linalg.eigh(C)
        Cp = (V * e**power) @ V.T
        U, S, Vh = torch.linalg.svd(W[name] @ Cp)
        best = (U[:, :4] * S[:4]) @ Vh[:4]
        got = ly.delta_weight().double() @ Cp
        assert rel_err(got, best) < 1e-5, name


def test_activations_and_gradient_directions():
    batches = make_batches(4)
    inputs = reference_inputs(batches)
    grads = reference_gradients(batches)
    m_act, m_grad = with_adapters(), with_adapters()
    initialize_adapters(m_act, "activations", batches)
    initialize_adapters(m_grad, "gradient", batches, forward_fn=lambda m, b: m(**b).loss)
    for name, ly in adapter_layers(m_act).items():
        x = inputs[name]
        V = torch.linalg.eigh(x.T @ x).eigenvectors.flip(1)[:, :4]
        overlap = torch.linalg.norm(ly.lora_Q.double() @ V) ** 2 / 4  # subspace similarity
        assert overlap > 1 - 1e-6 and float(ly.lora_P.detach().abs().max()) == 0.0
        assert torch.equal(ly.lora_lambda, torch.ones(4))
    for name, ly in adapter_layers(m_grad).items():
        U, S, Vh = torch.linalg.svd(grads[name])
        # λ-gradient of slot i is s·p_iᵀ G q_i = ±σ_i: the top singular values of G
        pg = (ly.lora_P.double().T @ grads[name] @ ly.lora_Q.double().T).diagonal().abs()
        torch.testing.assert_close(pg, S[:4], rtol=1e-4, atol=1e-6)
        assert float(ly.lora_lambda.detach().abs().max()) == 0.0


@pytest.mark.parametrize("strategy", ["svd", "covariance", "activations", "gradient"])
def test_trained_model_merges_and_exports_to_the_original_base(strategy, tmp_path):
    batches = make_batches(4)
    model = with_adapters()
    initialize_adapters(model, strategy, batches)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for b in batches[:3]:
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    trained = logits(model, batches)
    assert rel_err(trained, logits(tiny_bert(0), batches)) > 1e-3  # it did train
    save_adapter(model, tmp_path / "adapter")
    merge_adapters(model)
    assert rel_err(logits(model, batches), trained) <= 1e-5
    unmerge_adapters(model)
    fresh = tiny_bert(0)  # the ORIGINAL base weights: the shift comes from the adapter file
    load_adapter(fresh, tmp_path / "adapter")
    assert rel_err(logits(fresh, batches), trained) <= 1e-5


def test_invalid_names_and_missing_data_are_reported():
    model = with_adapters()
    with pytest.raises(ValueError, match=r"'pissa'.*valid.*'lora', 'svd', 'covariance'"):
        initialize_adapters(model, "pissa")
    with pytest.raises(ValueError, match="needs calibration batches"):
        initialize_adapters(model, "covariance", None)
    with pytest.raises(ValueError, match="covariance_form='white'"):
        initialize_adapters(model, "covariance", make_batches(1), covariance_form="white")
    with pytest.raises(ValueError, match="components='bottom'"):
        initialize_adapters(model, "gradient", make_batches(1), components="bottom")
    with pytest.raises(ValueError, match="shrinkage='lw'"):
        initialize_adapters(model, "covariance", make_batches(1), shrinkage="lw")
    initialize_adapters(model, "svd")
    with pytest.raises(ValueError, match="base shift"):
        initialize_adapters(model, "svd")
