"""The noise floor of growth candidates (``RankController(denoise_growth=True)``).

References computed another way: the sign-flipped gradient ``Σ ε δ xᵀ`` from per-sample
autograd weight gradients, the noise floor of an exactly sketchable (low-rank) matrix from its
dense SVD; behaviour on a planted layer: a direction that stands above the batch noise is still
grown and kept, and on a pure-noise gradient the swaps of live triplets for noise directions
(the plain rule's churn) nearly stop.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adarank.allocation import BudgetSchedule, RankController
from adarank.allocation.capture import LayerCapture, sample_signs
from adarank.allocation.growth import (
    Candidates,
    candidates_from_sketch,
    sketch_test_matrices,
)
from adarank.modules import SVDLoRALinear, add_adapters

D_IN, D_OUT = 12, 10


def test_sample_signs_alternate_per_sample_and_follow_subsampling():
    x3 = torch.zeros(4, 3, 5)  # 4 samples of 3 tokens
    assert sample_signs(x3).flatten().tolist() == [1.0] * 3 + [-1.0] * 3 + [1.0] * 3 + [-1.0] * 3
    x2 = torch.zeros(5, 7)  # rows are samples
    assert sample_signs(x2).flatten().tolist() == [1.0, -1.0, 1.0, -1.0, 1.0]
    idx = torch.tensor([0, 4, 8])  # strided tokens of x3: samples 0, 1, 2
    assert sample_signs(x3, idx).flatten().tolist() == [1.0, -1.0, 1.0]


def _per_sample_grads(base: nn.Linear, layer: SVDLoRALinear, x, t) -> torch.Tensor:
    """Full-weight gradient of each sample's loss (autograd on a dense copy), (n, d_out, d_in)."""
    ref = nn.Linear(D_IN, D_OUT).double()
    with torch.no_grad():
        delta = (
            layer.scaling
            * layer.lora_P.double()
            @ torch.diag(layer.lora_lambda.double())
            @ layer.lora_Q.double()
        )
        ref.weight.copy_(base.weight.double() + delta)
        ref.bias.copy_(base.bias.double())
    out = []
    for i in range(x.shape[0]):
        ref.zero_grad()
        ((ref(x[i].double()) - t[i].double()) ** 2).sum().backward()
        out.append(ref.weight.grad.clone())
    return torch.stack(out)


def test_noise_sketch_equals_sketch_of_the_sign_flipped_gradient():
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    layer = SVDLoRALinear(base, 3, scaling=0.5)
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.tensor([1.0, -0.5, 0.3]))
    cap = LayerCapture(layer)
    layer.train()
    omega, psi = sketch_test_matrices(layer.lora_P, layer.lora_Q, 3, seed=1)
    cap.capture_gradient(True, sketch=(omega, psi), noise=True)
    x, t = torch.randn(6, 4, D_IN), torch.randn(6, 4, D_OUT)
    # two micro-batches of 2 and 4 samples (even: the signs are those of the whole batch)
    for sl in (slice(0, 2), slice(2, 6)):
        ((layer(x[sl]) - t[sl]) ** 2).sum().backward()
    g = _per_sample_grads(base, layer, x, t)
    eps = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    g_sum, g_flip = g.sum(0), torch.einsum("n,noi->oi", eps, g)
    y, w = cap.captured_sketch
    yn, wn = cap.captured_noise_sketch
    torch.testing.assert_close(y.double(), g_sum @ omega.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w.double(), psi.double() @ g_sum, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(yn.double(), g_flip @ omega.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(wn.double(), psi.double() @ g_flip, atol=1e-4, rtol=1e-4)
    assert cap.memory_bytes() >= 2 * (y.nbytes + w.nbytes)
    cap.capture_gradient(False)
    assert cap.captured_noise_sketch is None
    cap.capture_gradient(True, sketch=(omega, psi))  # the plain rule: no noise sketch kept
    ((layer(x) - t) ** 2).sum().backward()
    assert cap.captured_sketch is not None and cap.captured_noise_sketch is None


def test_noise_floor_of_an_exactly_sketched_matrix_is_its_top_singular_value():
    """A rank-3 noise matrix is captured exactly by the sketch: ν = σ₁ of its projection."""
    g = torch.Generator().manual_seed(0)
    d_out, d_in, r, k = 40, 30, 2, 4
    P = torch.linalg.qr(torch.randn(d_out, r, generator=g)).Q
    Q = torch.linalg.qr(torch.randn(d_in, r, generator=g)).Q.T
    signal = 5.0 * torch.outer(torch.randn(d_out, generator=g), torch.randn(d_in, generator=g))
    noise = torch.randn(d_out, 3, generator=g) @ torch.randn(3, d_in, generator=g)
    omega, psi = sketch_test_matrices(P, Q, k, seed=2)
    G = (signal + noise).double()
    cand = candidates_from_sketch(
        G @ omega.double(),
        psi.double() @ G,
        psi,
        P,
        Q,
        k,
        noise_sketch=(noise.double() @ omega.double(), psi.double() @ noise.double()),
    )
    eye_o, eye_i = torch.eye(d_out, dtype=torch.float64), torch.eye(d_in, dtype=torch.float64)
    proj = (
        (eye_o - P.double() @ P.double().T) @ noise.double() @ (eye_i - Q.double().T @ Q.double())
    )
    assert cand.noise == pytest.approx(float(torch.linalg.svdvals(proj)[0]), rel=1e-6)
    expect = (cand.sigma**2 - cand.noise**2).clamp_min(0).sqrt()
    torch.testing.assert_close(cand.signal, expect)
    assert cand.signal[0] > 0 and float(cand.sigma[0]) > cand.noise  # the planted direction
    assert not bool(cand.keep(cand.signal > 0).signal.eq(0).any())
    plain = candidates_from_sketch(G @ omega.double(), psi.double() @ G, psi, P, Q, k)
    assert plain.noise == 0.0 and torch.equal(plain.signal, plain.sigma.double())


def test_candidates_keep_selects_and_carries_the_noise_floor():
    cand = Candidates(
        torch.eye(5)[:, :3], torch.eye(4)[:3], torch.tensor([3.0, 2.0, 1.0]), torch.ones(3), 2.5
    )
    assert cand.signal.tolist() == pytest.approx([(9 - 6.25) ** 0.5, 0.0, 0.0])
    kept = cand.keep(cand.signal > 0)
    assert kept.k == 1 and kept.noise == 2.5 and kept.p_cols.shape == (5, 1)


class _Planted(nn.Module):
    """One adapted layer; the target is W* x with W* = W0 + a planted rank-1 update."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(24, 20)


def _train(signal: float, denoise: bool, seed: int = 0, steps: int = 60):
    """60 Adam steps on one layer; the budget (3 triplets) is reached by step 10 and then binds,
    so a grown triplet must displace a live one. Returns the controller and how well the
    adapter's ΔW points along the planted uvᵀ (cosine in the Frobenius inner product)."""
    torch.manual_seed(seed)
    model = _Planted()
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(20, generator=g), dim=0)
    v = torch.nn.functional.normalize(torch.randn(24, generator=g), dim=0)
    w_star = model.lin.weight.detach() + signal * torch.outer(u, v)
    layers = add_adapters(model, ["lin"], 1, scaling=1.0, seed=seed)
    sched = BudgetSchedule(
        final_budget=3 * 45, total_steps=steps, init_budget=3 * 45, warmup_steps=5,
        final_steps=10, interval=5, decay="constant",
    )  # fmt: skip
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl = RankController(layers, sched, denoise_growth=denoise, optimizer=opt, seed=seed)
    for step in range(1, steps + 1):
        x = torch.randn(32, 24, generator=g)
        noise = 0.5 * torch.randn(32, 20, generator=g)  # the sampling noise of the target
        loss = ((model.lin(x) - (x @ w_star.T + noise)) ** 2).mean()
        loss.backward()
        ctl.observe()
        opt.step()
        ctl.step(step)
        opt.zero_grad(set_to_none=True)
    delta = layers["lin"].delta_weight().detach().double()
    match = float((u.double() @ delta @ v.double()) / delta.norm().clamp_min(1e-30))
    return ctl, match


def _counts(ctl: RankController) -> tuple[int, int]:
    return sum(e.n_grown for e in ctl.history), sum(e.n_pruned for e in ctl.history)


@pytest.mark.parametrize("seed", [0, 1])
def test_denoised_growth_keeps_a_planted_direction_and_stops_churning_on_noise(seed):
    ctl, match = _train(3.0, True, seed)
    assert _counts(ctl)[0] >= 1 and match > 0.95  # the planted direction is grown and kept
    # nothing to learn but the batch noise: the plain rule keeps swapping live triplets for
    # noise directions; the corrected one stays (nearly) put
    grown_plain, pruned_plain = _counts(_train(0.0, False, seed)[0])
    grown_dn, pruned_dn = _counts(_train(0.0, True, seed)[0])
    assert pruned_plain >= 8 and grown_plain >= 8
    assert pruned_dn <= pruned_plain // 3 and grown_dn <= grown_plain // 2


def test_denoise_growth_must_be_a_bool():
    layers = add_adapters(_Planted(), ["lin"], 1)
    with pytest.raises(TypeError, match="denoise_growth=1"):
        RankController(layers, None, denoise_growth=1)
