"""Factor algebra shared by the exports: total update (with shift) and LoRA → SVD re-factoring."""

from __future__ import annotations

import pytest
import torch

from adarank.export import refactor_lora, total_update_factors
from adarank.modules import SVDLoRALinear


def test_refactor_lora_is_exact_orthonormal_and_sorted():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(20, 5, generator=g), torch.randn(5, 12, generator=g)
    P, lam, Q = refactor_lora(B, A, scale=0.7)
    assert P.shape == (20, 5) and lam.shape == (5,) and Q.shape == (5, 12)
    torch.testing.assert_close((P * lam) @ Q, 0.7 * B @ A, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(P.T @ P, torch.eye(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(Q @ Q.T, torch.eye(5), atol=1e-5, rtol=0)
    assert torch.all(lam[:-1] >= lam[1:]) and torch.all(lam >= 0)
    # λ are the singular values of the product (reference: SVD of the full matrix)
    ref = torch.linalg.svdvals((0.7 * B @ A).double())[:5].float()
    torch.testing.assert_close(lam, ref, atol=1e-5, rtol=1e-5)


def test_refactor_lora_rejects_mismatched_factors():
    with pytest.raises(ValueError, match=r"B \(d_out, r\) and A \(r, d_in\)"):
        refactor_lora(torch.zeros(4, 3), torch.zeros(2, 5), 1.0)


def test_total_update_includes_scaling_and_negative_shift():
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 7)
    w0 = base.weight.detach().clone()
    layer = SVDLoRALinear(base, 3, scaling=2.5)
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.randn(3))
    layer.shift_base(torch.randn(7, 2), torch.randn(2, 10))
    P, lam, Q = total_update_factors(layer)
    assert lam.shape == (5,)
    # reference: the effective weight of the layer minus the ORIGINAL base weight
    effective = layer.base_layer.weight.detach() + layer.delta_weight()
    torch.testing.assert_close((P * lam) @ Q, effective - w0, atol=1e-5, rtol=1e-5)
