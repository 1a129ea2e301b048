"""Adapter dtype vs base dtype: a bf16 base keeps float32 adapters unless asked otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adarank.modules import SVDLoRALinear, add_adapters


def _layer(adapter_dtype=torch.float32) -> SVDLoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(24, 16).to(torch.bfloat16)
    layer = SVDLoRALinear(base, 4, scaling=2.0, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.tensor([0.5, -0.3, 0.2, 0.1]))
    return layer


def test_bf16_base_fp32_adapter_forward_matches_the_float64_maths() -> None:
    layer = _layer()
    assert {p.dtype for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q)} == {torch.float32}
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 16)
    w = layer.base_layer.weight.double()
    b = layer.base_layer.bias.double()
    P, lam, Q = (t.detach().double() for t in (layer.lora_P, layer.lora_lambda, layer.lora_Q))
    ref = x.double() @ w.T + b + 2.0 * ((x.double() @ Q.T) * lam) @ P.T
    assert torch.allclose(y.double(), ref, rtol=2e-2, atol=2e-2)
    delta = y.double() - layer.base_layer(x).double()
    assert delta.abs().max() > 0.05  # the adapter contributes
    y.float().sum().backward()
    assert layer.lora_lambda.grad.dtype == torch.float32
    assert layer.lora_Q.grad.abs().sum() > 0 and layer.base_layer.weight.grad is None


def test_merge_on_a_bf16_base_matches_unmerged_within_bf16_rounding() -> None:
    layer = _layer().eval()
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        unmerged = layer(x).float()
        layer.merge()
        merged = layer(x).float()
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert torch.allclose(merged, unmerged, rtol=2e-2, atol=3e-2)


def test_adapter_dtype_by_name() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).to(torch.bfloat16)
    layers = add_adapters(model, ["0"], 2, adapter_dtype="bfloat16")
    assert layers["0"].lora_Q.dtype == torch.bfloat16
    assert model(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    for bad in ("float16", "fp32", torch.float64):
        with pytest.raises(ValueError, match="adapter dtype"):
            add_adapters(nn.Sequential(nn.Linear(8, 8)), ["0"], 2, adapter_dtype=bad)
