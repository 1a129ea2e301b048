"""The allocator's capture hooks (adarank.allocation.capture) against references computed from
the inputs: Σ (Qx)² and token counts, the full-weight gradient G = Σ δ xᵀ (autograd's weight
gradient of an un-adapted copy), their life cycle (installed by RankController, removed by
close()), and a layer that carries no capture state of its own."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from adarank.allocation import BudgetSchedule, RankController, install_capture
from adarank.allocation.capture import LayerCapture, installed
from adarank.modules import add_adapters
from adarank.modules.svd_lora import SVDLoRALinear

D_IN, D_OUT = 12, 10


def make_base(kind: str) -> nn.Module:
    """An nn.Linear, or a Conv1D holding the same weights transposed (same function)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    lin = nn.Linear(D_IN, D_OUT)
    if kind == "linear":
        return lin
    conv = Conv1D(D_OUT, D_IN)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.T)
        conv.bias.copy_(lin.bias)
    return conv


def weight_bias64(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Base weight in (d_out, d_in) layout and bias, float64."""
    w = base.weight.detach().double()
    return (w if isinstance(base, nn.Linear) else w.T), base.bias.detach().double()


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


@pytest.fixture(params=["linear", "conv1d"])
def kind(request) -> str:
    return request.param


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _hooks(module: nn.Module) -> int:
    """Number of hooks of any kind on ``module`` and its submodules."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, k)) for m in module.modules() for k in kinds)


def _schedule(total: int = 20) -> BudgetSchedule:
    return BudgetSchedule(
        final_budget=60, total_steps=total, warmup_steps=1, final_steps=4, interval=1
    )


def test_layer_outside_a_controller_has_no_hooks_or_capture_state(kind, seed):
    layer = SVDLoRALinear(make_base(kind), 3, max_rank=5).train()
    randomize(layer)
    attrs = set(vars(layer))
    layer(torch.randn(4, 5, D_IN)).sum().backward()
    layer.prune([1])
    layer.grow(torch.randn(D_OUT, 2), torch.randn(2, D_IN))
    assert _hooks(layer) == 0 and installed(layer) == []
    assert set(vars(layer)) == attrs  # training added no attribute
    assert not [a for a in attrs if "capture" in a or a.startswith(("z_", "_sketch"))]
    assert {n for n, _ in layer.named_parameters(recurse=False)} == {
        "lora_P",
        "lora_lambda",
        "lora_Q",
    }
    assert {n for n, _ in layer.named_buffers(recurse=False)} == {"shift_P", "shift_Q"}


def test_controller_installs_hooks_and_close_removes_them(seed):
    model = _mlp()
    layers = add_adapters(model, ["0", "2", "4"], 2, seed=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ctrl = RankController(layers, _schedule(), optimizer=opt, seed=0)
    assert all(len(la.slot_coords._forward_hooks) == 1 for la in layers.values())
    # growth sketches are armed for step 1 (an allocation step): a hook on each layer's output
    assert all(
        ctrl.capture[n].capturing and len(la._forward_hooks) == 1 for n, la in layers.items()
    )
    model.train()(torch.randn(7, 6)).pow(2).sum().backward()
    ctrl.observe()
    opt.step()
    assert ctrl.step(1) is not None
    ctrl.close()
    ctrl.close()  # idempotent
    assert _hooks(model) == 0
    assert all(installed(la) == [] for la in layers.values())
    assert ctrl.state_dict()["global_step"] == 1  # still readable
    with pytest.raises(RuntimeError, match="close"):
        ctrl.observe()
    with pytest.raises(RuntimeError, match="close"):
        ctrl.step(2)


def test_statistics_equal_inputs_energy_on_a_tiny_model(seed):
    """Σ (Qx)² and token counts from the hooks equal the values computed from each layer's
    input (obtained by running the plain layers by hand); eval and no-rank layers add none."""
    model = _mlp()
    layers = add_adapters(model, ["0", "2", "4"], {"0": 0, "2": 3, "4": 2}, seed=0)
    for la in layers.values():
        randomize(la)
    ctrl = RankController(layers, None)
    xs = [torch.randn(3, 4, 6), torch.randn(5, 6)]
    model.train()
    for x in xs:
        model(x).sum().backward()
    with torch.no_grad():
        model.eval()(torch.randn(9, 6))  # eval forwards are not counted
    tokens = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    h = tokens
    expected = {}
    for i, name in enumerate(("0", "2", "4")):
        la = layers[name]
        if la.rank:
            expected[name] = (h @ la.lora_Q.detach().double().T).pow(2).sum(0)
        w, b = (t.detach().double() for t in (la.base_layer.weight, la.base_layer.bias))
        h = h @ (w + delta64(la)).T + b
        h = torch.tanh(h) if i < 2 else h
    for name, cap in ctrl.capture.items():
        z_sum, count = cap.pop_stats()
        assert count == (17 if layers[name].rank else 0), name
        if layers[name].rank:
            torch.testing.assert_close(z_sum.double(), expected[name], rtol=1e-5, atol=1e-5)
        assert z_sum.shape == (layers[name].rank,)
        z_sum, count = cap.pop_stats()  # reset by the previous call
        assert count == 0 and torch.equal(z_sum, torch.zeros(layers[name].rank))
    ctrl.close()


def test_statistics_use_the_dropped_out_input(seed):
    """With dropout the energy is that of the adapter's (dropped-out) input, as in the forward."""
    layer = SVDLoRALinear(make_base("linear"), 3, dropout=0.5).train()
    cap = install_capture({"l": layer})["l"]
    x = torch.randn(6, D_IN)
    torch.manual_seed(5)
    layer(x)
    torch.manual_seed(5)  # the same mask: the dropout is the forward's only random draw
    h = F.dropout(x, 0.5, training=True).double()
    expected = (h @ layer.lora_Q.detach().double().T).pow(2).sum(0)
    z_sum, count = cap.pop_stats()
    torch.testing.assert_close(z_sum.double(), expected, rtol=1e-5, atol=1e-6)
    assert count == 6
    cap.remove()
    assert _hooks(layer) == 0


def test_stats_follow_prune_and_grow(seed):
    layer = SVDLoRALinear(make_base("linear"), 3, max_rank=5).train()
    (cap,) = install_capture({"l": layer}).values()
    layer(torch.randn(6, D_IN))
    before = cap.z_sq_sum.clone()
    keep = layer.prune([1])
    layer.grow(torch.randn(D_OUT, 2), torch.randn(2, D_IN))
    cap.remap(keep, 2)  # what RankController does after resizing
    z_sq_sum, _ = cap.pop_stats()
    assert torch.equal(z_sq_sum, torch.cat([before[[0, 2]], torch.zeros(2)]))
    # resized without remap (not by the controller): the sums restart at the new rank
    layer(torch.randn(6, D_IN))
    layer.prune([0])
    z_sq_sum, count = cap.pop_stats()
    assert count == 0 and torch.equal(z_sq_sum, torch.zeros(3))
    layer.prune([0])  # before any forward: the next forward starts at the new rank
    layer(torch.randn(2, D_IN))
    assert cap.z_sq_sum.shape == (2,) and cap.z_count == 2


@pytest.mark.parametrize("rank", [0, 3])
def test_capture_gradient_equals_full_weight_gradient(kind, rank, seed):
    base = make_base(kind)
    w, b = weight_bias64(base)
    layer = SVDLoRALinear(base, rank, scaling=0.5)
    randomize(layer)
    ref = nn.Linear(D_IN, D_OUT)  # the same function with a trainable full weight
    with torch.no_grad():
        ref.weight.copy_((w + delta64(layer)).float())
        ref.bias.copy_(b.float())
    cap = LayerCapture(layer)
    layer.train()
    cap.capture_gradient(True)
    xs = [torch.randn(3, 4, D_IN), torch.randn(5, D_IN)]
    targets = [torch.randn(3, 4, D_OUT), torch.randn(5, D_OUT)]
    for x, t in zip(xs, targets):  # two forward/backward calls accumulate
        ((layer(x) - t) ** 2).sum().backward()
        ((ref(x) - t) ** 2).sum().backward()
    assert cap.captured_grad.shape == (D_OUT, D_IN)
    torch.testing.assert_close(cap.captured_grad, ref.weight.grad, atol=1e-4, rtol=1e-5)
    tokens = torch.cat([x.reshape(-1, D_IN) for x in xs]).double()
    torch.testing.assert_close(cap.captured_inputs().double(), tokens, atol=1e-6, rtol=0)
    assert cap.captured_tokens == 17
    with torch.no_grad():
        layer(xs[0])  # no capture without autograd
    assert cap.captured_tokens == 17
    cap.capture_gradient(False)
    assert cap.captured_grad is None and cap.captured_inputs().shape == (0, D_IN)
    assert cap.captured_tokens == 0 and len(layer._forward_hooks) == 0
    cap.remove()
    assert _hooks(layer) == 0


def test_capture_subsamples_tokens_without_bias(kind, seed):
    """Above ``max_tokens`` an evenly strided token subset enters G, rescaled."""
    base = make_base(kind)
    w, b = weight_bias64(base)
    layer = SVDLoRALinear(base, 2)
    cap = LayerCapture(layer, max_tokens=10)
    layer.train()
    cap.capture_gradient(True)
    x = torch.randn(40, D_IN)
    t = torch.randn(40, D_OUT)
    ((layer(x) - t) ** 2).sum().backward()
    idx = torch.arange(0, 40, 4)
    ref = nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        ref.weight.copy_((w + delta64(layer)).float())
        ref.bias.copy_(b.float())
    ((ref(x[idx]) - t[idx]) ** 2).sum().backward()
    torch.testing.assert_close(cap.captured_grad, 4.0 * ref.weight.grad, atol=1e-4, rtol=1e-5)
    assert cap.captured_inputs().shape == (10, D_IN) and cap.captured_tokens == 40
    with pytest.raises(ValueError, match="max_tokens=0"):
        LayerCapture(layer, max_tokens=0)


def test_latest_capture_records_and_removal_hands_back(seed):
    """A second capture (e.g. a calibration pass) pauses the first until it is removed; a deep
    copy of a hooked layer records into neither."""
    layer = SVDLoRALinear(make_base("linear"), 3).train()
    first = install_capture({"l": layer})["l"]
    second = install_capture({"l": layer}, stats=False)["l"]
    layer(torch.randn(4, D_IN))
    assert first.z_count == 0 and second.z_count == 0
    copied = copy.deepcopy(layer)
    copied(torch.randn(4, D_IN))
    second.remove()
    layer(torch.randn(5, D_IN))
    assert first.z_count == 5 and installed(layer) == [first]
    copied(torch.randn(4, D_IN))
    assert first.z_count == 5
    first.remove()
    assert _hooks(layer) == 0 and installed(layer) == []
    with pytest.raises(RuntimeError, match="removed"):
        first.capture_gradient(True)
    with pytest.raises(TypeError, match="SVDLoRALinear"):
        install_capture({"x": nn.Linear(2, 2)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capture_on_cuda(kind, seed):
    layer = SVDLoRALinear(make_base(kind), 3).cuda().train()
    cap = LayerCapture(layer)
    cap.capture_gradient(True)
    x = torch.randn(4, D_IN)
    layer(x.cuda()).sum().backward()
    assert cap.pop_stats()[0].device.type == "cuda"
    assert cap.captured_grad.device.type == "cuda"
    torch.testing.assert_close(
        cap.captured_grad.cpu(), torch.ones(4, D_OUT).T @ x, atol=1e-4, rtol=1e-4
    )
