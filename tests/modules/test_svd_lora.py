"""SVDLoRALinear maths against independent float64 references (AdaLoRA Eq. 1, ΔW = P Λ Q)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adarank.modules.retraction import align_tied_triplets
from adarank.modules.svd_lora import SVDLoRALinear

D_IN, D_OUT = 12, 10


def make_base(kind: str, d_in: int = D_IN, d_out: int = D_OUT, seed: int = 0) -> nn.Module:
    """An nn.Linear, or a Conv1D holding the same weights transposed (same function)."""
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out)
    if kind == "linear":
        return lin
    conv = Conv1D(d_out, d_in)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.T)
        conv.bias.copy_(lin.bias)
    return conv


def weight_bias64(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Base weight in (d_out, d_in) layout and bias, float64."""
    w = base.weight.detach().double()
    return (w.T if isinstance(base, Conv1D) else w), base.bias.detach().double()


def randomize(layer: SVDLoRALinear, seed: int = 1) -> None:
    """Give every triplet a nonzero λ (and P, Q a perturbation) so ΔW ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.randn(layer.rank, generator=g) + 2.0)
        layer.lora_P.add_(0.1 * torch.randn(layer.lora_P.shape, generator=g))
        layer.lora_Q.add_(0.1 * torch.randn(layer.lora_Q.shape, generator=g))


def delta64(layer: SVDLoRALinear) -> torch.Tensor:
    """ΔW = scaling · Σ_i λ_i p_i q_iᵀ by einsum in float64 (independent of the layer's code)."""
    P, lam, Q = (t.detach().double() for t in (layer.lora_P, layer.lora_lambda, layer.lora_Q))
    return layer.scaling * torch.einsum("or,r,ri->oi", P, lam, Q)


def reference64(layer: SVDLoRALinear, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    return x.double() @ (w + delta64(layer)).T + b


@pytest.fixture(params=["linear", "conv1d"])
def kind(request) -> str:
    return request.param


def test_init_is_identity_with_orthonormal_directions(kind, seed):
    base = make_base(kind)
    x = torch.randn(3, 5, D_IN)
    expected = base(x).detach().clone()
    layer = SVDLoRALinear(base, 4)
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer.lora_lambda.detach(), torch.zeros(4))
    eye = torch.eye(4)
    torch.testing.assert_close(layer.lora_P.T @ layer.lora_P, eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.lora_Q @ layer.lora_Q.T, eye, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in base.parameters())


def test_conv1d_and_linear_agree(seed):
    lin = SVDLoRALinear(make_base("linear"), 3, scaling=0.5)
    conv = SVDLoRALinear(make_base("conv1d"), 3, scaling=0.5)
    randomize(lin)
    with torch.no_grad():
        for name in ("lora_P", "lora_lambda", "lora_Q"):
            getattr(conv, name).copy_(getattr(lin, name))
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(conv(x), lin(x), atol=1e-6, rtol=1e-6)
    assert (conv.d_out, conv.d_in) == (lin.d_out, lin.d_in) == (D_OUT, D_IN)
    assert conv.transposed and not lin.transposed


def test_delta_weight_and_forward_match_float64_einsum(kind, seed):
    base = make_base(kind)
    w, b = weight_bias64(base)
    layer = SVDLoRALinear(base, 5, scaling=0.25)
    randomize(layer)
    torch.testing.assert_close(layer.delta_weight().double(), delta64(layer), atol=1e-6, rtol=0)
    x = torch.randn(2, 3, D_IN)
    torch.testing.assert_close(layer(x).double(), reference64(layer, x, w, b), atol=1e-5, rtol=0)


def test_delta_singular_values_match_svd_of_the_dense_delta(kind, seed):
    """Non-orthonormal P, Q (as after training without a penalty): the QR route equals the SVD
    of the float64 ΔW; with orthonormal factors they are s·|λ|; rank 0 gives none."""
    layer = SVDLoRALinear(make_base(kind), 5, scaling=3.0)
    randomize(layer)  # random P, Q, λ: far from orthonormal
    gram = layer.lora_P.detach().T @ layer.lora_P.detach()
    assert (gram - torch.eye(5)).abs().max() > 0.1
    want = torch.linalg.svdvals(delta64(layer))[:5]
    torch.testing.assert_close(layer.delta_singular_values(), want, rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(seed)
    fresh = SVDLoRALinear(make_base(kind), 4, scaling=2.0, generator=gen)
    with torch.no_grad():
        fresh.lora_lambda.copy_(torch.tensor([0.5, -2.0, 0.25, 1.0]))
    want = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(fresh.delta_singular_values(), want, rtol=1e-6, atol=1e-6)
    fresh.set_rank(0)
    assert fresh.delta_singular_values().numel() == 0


def test_retract_keeps_delta_slots_and_parameters(kind, seed):
    """After a drift of P and Q, retract_() restores orthonormal factors with ΔW unchanged, λ =
    ΔW's singular values / s, every slot keeping its own triplet (λ given out of order, signs
    mixed) and the same Parameter objects (so an optimizer needs no update)."""
    gen = torch.Generator().manual_seed(seed)
    layer = SVDLoRALinear(make_base(kind), 4, scaling=2.0, generator=gen)
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.tensor([0.1, -0.8, 0.4, -0.2]))  # not sorted
        layer.lora_P.add_(0.02 * torch.randn(layer.lora_P.shape, generator=gen))
        layer.lora_Q.add_(0.02 * torch.randn(layer.lora_Q.shape, generator=gen))
    before = delta64(layer)
    P0, lam0, params = (
        layer.lora_P.detach().clone(),
        layer.lora_lambda.detach().clone(),
        [id(p) for p in layer.parameters()],
    )
    layer.retract_()
    torch.testing.assert_close(delta64(layer), before, atol=1e-6, rtol=0)
    eye = torch.eye(4)
    torch.testing.assert_close(
        layer.lora_P.detach().T @ layer.lora_P.detach(), eye, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        layer.lora_Q.detach() @ layer.lora_Q.detach().T, eye, atol=1e-5, rtol=0
    )
    sv = torch.linalg.svdvals(before)[:4] / 2.0
    lam = layer.lora_lambda.detach().double()
    torch.testing.assert_close(lam.abs().sort(descending=True).values, sv, atol=1e-6, rtol=0)
    assert torch.equal(torch.sign(lam.float()), torch.sign(lam0))  # slot i keeps its triplet
    assert (lam.float() - lam0).abs().max() < 0.05
    assert ((layer.lora_P.detach() * P0).sum(0) > 0.9).all()
    assert [id(p) for p in layer.parameters()] == params
    layer.set_rank(0)
    layer.retract_()  # rank 0: nothing to do


def test_retract_leaves_a_diverged_layer_untouched():
    """Non-finite factors (a diverged step) are left as they are, without raising, so the
    training loop's divergence guard reports the step instead of an SVD failure."""
    layer = SVDLoRALinear(nn.Linear(12, 10), rank=3, scaling=2.0)
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.tensor([0.5, float("nan"), 0.1]))
        layer.lora_P.add_(0.2)
    before = [t.detach().clone() for t in (layer.lora_P, layer.lora_lambda, layer.lora_Q)]
    layer.retract_()
    after = (layer.lora_P, layer.lora_lambda, layer.lora_Q)
    assert all(torch.equal(a.detach(), b) for a, b in zip(after[::2], before[::2]))
    assert torch.isnan(after[1][1]) and torch.equal(after[1][::2].detach(), before[1][::2])
    # non-finite directions are left alone too
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.tensor([0.5, 0.2, 0.1]))
        layer.lora_Q[1, 1] = float("inf")
    before = [t.detach().clone() for t in (layer.lora_P, layer.lora_lambda, layer.lora_Q)]
    layer.retract_()
    assert all(torch.equal(a.detach(), b) for a, b in zip(after, before))
    with torch.no_grad():
        layer.lora_Q[1, 1] = 0.3
    # finite factors whose product overflows float32 (λ·‖p‖·‖q‖ > 3.4e38) are kept as they are
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.tensor([1e30, 1.0, 1.0]))
        layer.lora_P.mul_(1e10)
    before = [t.detach().clone() for t in (layer.lora_P, layer.lora_lambda, layer.lora_Q)]
    layer.retract_()
    assert all(torch.equal(a.detach(), b) for a, b in zip(after, before))


def test_merge_equals_unmerged_and_unmerge_restores(kind, seed):
    base = make_base(kind)
    w0 = base.weight.detach().clone()
    layer = SVDLoRALinear(base, 4, scaling=2.0)
    randomize(layer)
    x = torch.randn(6, D_IN)
    y = layer(x).detach()
    for _ in range(2):  # merging twice is a no-op
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)
    delta = layer.delta_weight()
    merged_w = base.weight.detach()
    torch.testing.assert_close(merged_w - w0, delta.T if kind == "conv1d" else delta)
    for _ in range(2):
        layer.unmerge()
        assert not layer.merged
        torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)


def test_resizing_a_merged_layer_raises(seed):
    layer = SVDLoRALinear(make_base("linear"), 3)
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.prune([0])
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.grow(torch.randn(D_OUT, 1), torch.randn(1, D_IN))
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_rank(2)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.shift_base(torch.randn(D_OUT, 1), torch.randn(1, D_IN))
    assert layer.rank == 3


def test_grow_appends_zero_lambda_triplets_without_changing_output(kind, seed):
    layer = SVDLoRALinear(make_base(kind), 2, max_rank=6)
    randomize(layer)
    x = torch.randn(5, D_IN)
    y = layer(x).detach()
    new = layer.grow(torch.randn(D_OUT, 3), torch.randn(3, D_IN))
    assert list(new) == [2, 3, 4] and layer.rank == 5
    assert torch.equal(layer.lora_lambda.detach()[2:], torch.zeros(3))
    torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=0)
    layer.grow(torch.randn(D_OUT, 1), torch.randn(1, D_IN))  # past the initial rank, to max_rank
    assert layer.rank == 6
    with pytest.raises(ValueError, match="max_rank=6"):
        layer.grow(torch.randn(D_OUT, 1), torch.randn(1, D_IN))
    with pytest.raises(ValueError, match="d_out"):
        layer.grow(torch.randn(D_OUT + 1, 1), torch.randn(1, D_IN))


def test_grow_with_given_lambda_adds_that_triplet(seed):
    base = make_base("linear")
    w, b = weight_bias64(base)
    layer = SVDLoRALinear(base, 1, scaling=0.5)
    randomize(layer)
    p, q = torch.randn(D_OUT, 1), torch.randn(1, D_IN)
    x = torch.randn(4, D_IN)
    before = layer(x).detach().double()
    layer.grow(p, q, lam=torch.tensor([3.0]))
    expected = before + 0.5 * 3.0 * (x.double() @ q.double().T) @ p.double().T
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(x).double(), reference64(layer, x, w, b), atol=1e-5, rtol=0)


def test_prune_zero_lambda_is_function_preserving(kind, seed):
    layer = SVDLoRALinear(make_base(kind), 4)
    randomize(layer)
    with torch.no_grad():
        layer.lora_lambda[1] = 0.0
    x = torch.randn(5, D_IN)
    y = layer(x).detach()
    old_P = layer.lora_P.detach().clone()
    keep = layer.prune([1])
    assert keep.tolist() == [0, 2, 3] and layer.rank == 3
    torch.testing.assert_close(layer.lora_P.detach(), old_P[:, keep])
    torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=0)


def test_prune_nonzero_triplet_removes_exactly_its_contribution(kind, seed):
    layer = SVDLoRALinear(make_base(kind), 4, scaling=0.7)
    randomize(layer)
    x = torch.randn(2, 3, D_IN)
    y = layer(x).detach().double()
    p2, lam2, q2 = (layer.lora_P[:, 2].double(), layer.lora_lambda[2].double(), layer.lora_Q[2])
    contribution = 0.7 * lam2 * (x.double() @ q2.double())[..., None] * p2.detach()
    layer.prune(torch.tensor([2]))
    torch.testing.assert_close(layer(x).double(), y - contribution.detach(), atol=1e-5, rtol=0)
    with pytest.raises(IndexError, match="rank 3"):
        layer.prune([3])


def test_rank_zero_costs_nothing_and_equals_base(kind, seed):
    base = make_base(kind)
    x = torch.randn(4, D_IN)
    expected = base(x).detach().clone()
    layer = SVDLoRALinear(base, 0)
    assert torch.equal(layer(x), expected)
    assert layer.lora_P.shape == (D_OUT, 0)
    assert layer.lora_lambda.shape == (0,)
    assert layer.lora_Q.shape == (0, D_IN)
    assert layer.live_params == 0
    grown = SVDLoRALinear(make_base(kind), 3)
    randomize(grown)
    grown.prune(range(3))  # pruning everything brings back the base function
    assert grown.rank == 0 and torch.equal(grown(x), expected)


def test_parameter_tensors_are_exactly_live_rank_sized(seed):
    layer = SVDLoRALinear(make_base("linear"), 4, max_rank=8)
    layer.prune([0, 3])
    layer.grow(torch.randn(D_OUT, 5), torch.randn(5, D_IN))
    r = 7
    assert layer.rank == r
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters() if p.requires_grad}
    assert shapes == {"lora_P": (D_OUT, r), "lora_lambda": (r,), "lora_Q": (r, D_IN)}
    assert layer.triplet_cost == D_IN + D_OUT + 1
    assert (
        layer.live_params
        == r * (D_IN + D_OUT + 1)
        == sum(p.numel() for p in layer.parameters() if p.requires_grad)
    )
    layer.set_rank(2)
    assert layer.lora_Q.shape == (2, D_IN)
    layer.set_rank(4)
    assert layer.lora_P.shape == (D_OUT, 4)
    assert torch.equal(layer.lora_lambda.detach()[2:], torch.zeros(2))
    with pytest.raises(ValueError, match="max_rank=8"):
        layer.set_rank(9)


def test_resize_keeps_frozen_state(seed):
    layer = SVDLoRALinear(make_base("linear"), 3)
    layer.requires_grad_(False)
    layer.prune([0])
    layer.grow(torch.randn(D_OUT, 1), torch.randn(1, D_IN))
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_adapter(kind, dtype, seed):
    base = make_base(kind).to(dtype)
    w, b = weight_bias64(base)  # the rounded half-precision weights, in float64
    layer = SVDLoRALinear(base, 3)
    randomize(layer)
    assert all(p.dtype == torch.float32 for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q))
    x = torch.randn(2, 4, D_IN).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = reference64(layer, x, w, b)
    torch.testing.assert_close(y.double(), ref, atol=0.05, rtol=0.02)
    layer.merge()
    assert base.weight.dtype == dtype
    torch.testing.assert_close(layer(x).double(), ref, atol=0.1, rtol=0.03)


def test_whole_layer_cast_to_bf16_still_runs(kind, seed):
    layer = SVDLoRALinear(make_base(kind), 3)
    randomize(layer)
    x = torch.randn(4, D_IN)
    ref = layer(x).detach()
    layer.to(torch.bfloat16)  # e.g. a trainer's "bf16-true" precision casts every parameter
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)


def test_shift_base_moves_low_rank_part_out_of_w0(kind, seed):
    base = make_base(kind)
    w, _ = weight_bias64(base)
    layer = SVDLoRALinear(base, 2)
    P0, Q0 = torch.randn(D_OUT, 2), torch.randn(2, D_IN)
    layer.shift_base(P0, Q0)
    w_new, _ = weight_bias64(base)
    torch.testing.assert_close(w_new, w - P0.double() @ Q0.double(), atol=1e-5, rtol=0)
    assert torch.equal(layer.shift_P, P0) and torch.equal(layer.shift_Q, Q0)
    torch.testing.assert_close(layer.shift_weight(), P0 @ Q0)
    with pytest.raises(ValueError, match="d_out=10"):
        layer.shift_base(torch.randn(D_OUT + 1, 1), torch.randn(1, D_IN))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=-1), "rank=-1"),
        (dict(rank=11), "rank=11"),
        (dict(rank=2, max_rank=11), "max_rank=11"),
        (dict(rank=2, scaling=0.0), "scaling=0.0"),
        (dict(rank=2, dropout=1.0), "dropout=1.0"),
    ],
)
def test_constructor_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SVDLoRALinear(make_base("linear"), **kwargs)


def test_constructor_rejects_non_linear_base():
    with pytest.raises(TypeError, match="LayerNorm"):
        SVDLoRALinear(nn.LayerNorm(4), 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layer_works_on_cuda(kind, seed):
    base = make_base(kind)
    w, b = weight_bias64(base)
    layer = SVDLoRALinear(base, 3, max_rank=5)
    randomize(layer)
    x = torch.randn(4, D_IN)
    ref = reference64(layer, x, w, b)
    layer = layer.cuda().train()
    y = layer(x.cuda())
    assert y.device.type == "cuda"
    torch.testing.assert_close(y.cpu().double(), ref, atol=1e-4, rtol=1e-4)
    layer.prune(torch.tensor([0], device="cuda"))
    layer.grow(torch.randn(D_OUT, 2), torch.randn(2, D_IN))  # CPU directions are moved
    assert {p.device.type for p in layer.parameters()} == {"cuda"}
    y = layer(x.cuda()).detach()
    layer.merge()
    torch.testing.assert_close(layer(x.cuda()), y, atol=1e-5, rtol=1e-5)
    layer.unmerge()


def test_up_projection_gradients_and_saved_activations():
    """``(z ⊙ sλ) Pᵀ`` has autograd's gradients (gradcheck in float64) and saves one rank-sized
    activation per token, as LoRA's ``B(Ax)`` does: the layer keeps x and z, nothing else of
    size tokens × rank (plain autograd also kept z ⊙ sλ)."""
    from adarank.modules.svd_lora import _ScaledUp

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    P = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_ScaledUp.apply, (z, c, P))

    n, d_in, d_out, r = 50, 12, 9, 3
    layer = SVDLoRALinear(nn.Linear(d_in, d_out), r, scaling=2.0)
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(n, d_in)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    assert sorted(s for s in shapes if s[0] == n) == [(n, r), (n, d_in)]
    out.square().sum().backward()
    ref = layer.base_layer(x) + 2.0 * (x @ layer.lora_Q.T * layer.lora_lambda) @ layer.lora_P.T
    assert torch.allclose(out, ref, atol=1e-6)
    P, lam, Q = (
        t.detach().requires_grad_() for t in (layer.lora_P, layer.lora_lambda, layer.lora_Q)
    )
    (layer.base_layer(x) + 2.0 * (x @ Q.T * lam) @ P.T).square().sum().backward()
    for mine, theirs in ((layer.lora_P, P), (layer.lora_lambda, lam), (layer.lora_Q, Q)):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6)


def test_retract_leaves_tied_triplets_in_their_slots(seed):
    """Tied |λ| (all equal, as after Adam's first step from λ = 0; or the zeros of freshly grown
    triplets) leave the SVD basis of the tie to rounding: retract_() must keep the slots'
    own directions and values instead, and a rounding-level perturbation must not move them."""
    gen = torch.Generator().manual_seed(seed)
    layer = SVDLoRALinear(nn.Linear(16, 12), 5, scaling=2.0, generator=gen)
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.tensor([1e-3, -1e-3, 1e-3, 1e-3, -1e-3]))
    before = [t.detach().clone() for t in (layer.lora_P, layer.lora_lambda, layer.lora_Q)]
    twin = SVDLoRALinear(nn.Linear(16, 12), 5, scaling=2.0)
    twin.load_state_dict(layer.state_dict())
    with torch.no_grad():
        twin.lora_P.add_(1e-7 * torch.randn(twin.lora_P.shape, generator=gen))
        twin.lora_Q.add_(1e-7 * torch.randn(twin.lora_Q.shape, generator=gen))
    layer.retract_()
    twin.retract_()
    for got, want in zip((layer.lora_P, layer.lora_lambda, layer.lora_Q), before):
        torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=0)
    for a, b in zip(layer.parameters(), twin.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=0)
    # two large distinct triplets and three grown ones at λ = 0: the zeros stay in place,
    # the large ones are re-diagonalised (their directions do rotate, ΔW is kept)
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.tensor([0.0, 0.9, 0.0, -0.4, 0.0]))
        layer.lora_P[:, 1].add_(0.05 * layer.lora_P[:, 3])
    zeros_p, zeros_q = layer.lora_P.detach()[:, ::2].clone(), layer.lora_Q.detach()[::2].clone()
    want = delta64(layer)
    layer.retract_()
    torch.testing.assert_close(delta64(layer), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.lora_P.detach()[:, ::2], zeros_p, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.lora_Q.detach()[::2], zeros_q, atol=1e-6, rtol=0)
    assert torch.equal(layer.lora_lambda.detach()[::2], torch.zeros(3))


def test_align_tied_triplets_rotates_a_tie_onto_the_old_slots(seed):
    """The Procrustes step against a brute-force check: a cluster of equal σ given in a random
    rotated basis is turned back onto the slots exactly (signs included), values unchanged;
    σ apart by more than the tolerance are never mixed."""
    gen = torch.Generator().manual_seed(seed)
    turn, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    # new triplets 0..2 = a rotation of old slots 1..3 (tied σ = 0.5), new 3 = old slot 0
    u = torch.zeros(4, 4, dtype=torch.float64)
    u[1:, :3] = turn
    u[0, 3] = 1.0
    sigma = torch.tensor([0.5, 0.5, 0.5, 0.1], dtype=torch.float64)
    lam_sign = torch.tensor([1.0, -1.0, 1.0, 1.0])
    v = u * lam_sign[:, None]  # a negative old λ: its q points the other way
    (turn_p, turn_q), lam = align_tied_triplets(u, v, sigma, lam_sign)
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(u @ turn_p, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(v @ turn_q, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(lam, torch.tensor([0.1, -0.5, 0.5, 0.5], dtype=torch.float64))
    # the same σ set 1e-3 apart: no cluster, the SVD basis is kept as it is (columns permuted)
    apart = torch.tensor([0.502, 0.501, 0.5, 0.1], dtype=torch.float64)
    (turn_p, _), lam = align_tied_triplets(u, v, apart, lam_sign)
    assert ((turn_p.abs() == 1) | (turn_p == 0)).all()
    assert sorted(lam.abs().tolist()) == sorted(apart.tolist())


def test_cap_delta_bounds_the_spectral_norm_and_keeps_directions(kind, seed):
    """After retract_() the triplets are ΔW's singular triplets: cap_delta_(m) must leave
    ‖ΔW‖₂ = m exactly (checked on the dense float64 ΔW), shrink only the triplets above m and
    keep every direction; a non-positive bound is rejected."""
    layer = SVDLoRALinear(make_base(kind), 4, scaling=2.0)
    randomize(layer)
    layer.retract_()
    sv = torch.linalg.svdvals(delta64(layer))[:4]
    m = float(sv[1] + sv[2]) / 2  # two triplets above, two below
    P0, Q0, lam0 = (t.detach().clone() for t in (layer.lora_P, layer.lora_Q, layer.lora_lambda))
    layer.cap_delta_(m)
    after = torch.linalg.svdvals(delta64(layer))[:4]
    torch.testing.assert_close(
        after[:2], torch.full((2,), m, dtype=torch.float64), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(after[2:], sv[2:], rtol=1e-6, atol=0)
    assert torch.equal(layer.lora_P.detach(), P0) and torch.equal(layer.lora_Q.detach(), Q0)
    assert torch.equal(torch.sign(layer.lora_lambda.detach()), torch.sign(lam0))
    with pytest.raises(ValueError, match="max_sv=0"):
        layer.cap_delta_(0)
