"""Gradient checkpointing leaves allocation unchanged (tiny random Llama, all linear layers).

A checkpointed block's forward runs again inside backward. The adapter statistics (Σ(Qx)²,
token counts), the gradients, the scorer state after ``observe()``, the growth sketches and a
whole controller run with growth must be the same as without checkpointing — for
non-reentrant checkpointing (what ``build_hf_model`` enables) and for reentrant checkpointing
that a user enables on the model.
"""

from __future__ import annotations

import pytest
import torch

import adarank.allocation.capture as capture
from adarank.allocation import BudgetSchedule, RankController, install_capture
from adarank.models import build_hf_model
from adarank.modules import add_adapters

MODES = ("off", "non_reentrant", "reentrant")


def _build(mode: str):
    model = build_hf_model(
        "tiny-llama", task="causal_lm", seed=0, gradient_checkpointing=mode == "non_reentrant"
    )
    if mode == "reentrant":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    layers = add_adapters(model, "all-linear", 4, scaling=16.0, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # λ ≠ 0 so that P and Q get gradients too
        for layer in layers.values():
            layer.lora_lambda.copy_(0.05 * torch.randn(layer.rank, generator=g))
    return model.train(), layers


def _ids(step: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(5, 261, (4, 16), generator=g)


def _backward(model, step: int = 0) -> None:
    ids = _ids(step)
    model(input_ids=ids, labels=ids).loss.backward()


def _grads(layers) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{p}": getattr(layer, p).grad.clone()
        for n, layer in layers.items()
        for p in ("lora_P", "lora_lambda", "lora_Q")
    }


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def _observe_step(mode: str):
    """One forward/backward + observe() with the growth sketches armed for step 1."""
    model, layers = _build(mode)
    schedule = BudgetSchedule(
        final_budget=2000, total_steps=20, warmup_steps=1, final_steps=4, interval=1
    )
    controller = RankController(layers, schedule, seed=0)  # arms the sketches of step 1
    caps = controller.capture
    assert all(cap.sketch is not None for cap in caps.values())
    _backward(model)
    out = {
        "z": {n: (cap.z_sq_sum.clone(), cap.z_count) for n, cap in caps.items()},
        "grads": _grads(layers),
        "sketch": {n: cap.captured_sketch for n, cap in caps.items()},
        "tokens": {n: cap.captured_tokens for n, cap in caps.items()},
        "inputs": {n: cap.captured_inputs() for n, cap in caps.items()},
    }
    controller.observe()
    out["scorer"] = controller.scorer.state_dict()
    return out


@pytest.fixture(scope="module")
def reference():
    return _observe_step("off")


@pytest.mark.parametrize("mode", MODES[1:])
def test_one_step_statistics_match_without_checkpointing(reference, mode: str) -> None:
    got = _observe_step(mode)
    for name, (z, count) in reference["z"].items():
        assert got["z"][name][1] == count == 4 * 16, name
        assert _close(got["z"][name][0], z), name
    for key, grad in reference["grads"].items():
        assert grad.abs().sum() > 0, key
        assert _close(got["grads"][key], grad), key
    for name, (y, w) in reference["sketch"].items():
        assert got["tokens"][name] == reference["tokens"][name] == 4 * 16, name
        assert _close(got["inputs"][name], reference["inputs"][name]), name
        gy, gw = got["sketch"][name]
        assert y.abs().sum() > 0 and _close(gy, y) and _close(gw, w), name
    assert got["scorer"].keys() == reference["scorer"].keys()
    for name, state in reference["scorer"].items():
        for key, value in state.items():
            assert _close(got["scorer"][name][key], value), (name, key)


@pytest.mark.parametrize("mode", MODES[1:])
def test_recomputation_is_exercised(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Without the recomputation guard the statistics double (so the test above can fail)."""
    monkeypatch.setattr(capture, "in_backward_pass", lambda: False)
    model, layers = _build(mode)
    caps = install_capture(layers)
    _backward(model)
    assert {cap.z_count for cap in caps.values()} == {2 * 4 * 16}


def _train(mode: str, steps: int = 10):
    model, layers = _build(mode)
    schedule = BudgetSchedule(
        final_budget=sum(layer.live_params for layer in layers.values()) // 2,
        total_steps=steps,
        warmup_steps=1,
        final_steps=2,
        interval=2,
        grow_cooldown=0,
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = RankController(layers, schedule, optimizer=opt, seed=0, max_rank=8)
    events = []
    for step in range(steps):
        _backward(model, step)
        controller.observe()
        opt.step()
        event = controller.step(step + 1)
        if event is not None:
            events.append((event.ranks, event.grown, event.pruned))
        opt.zero_grad()
    state = {
        f"{n}.{p}": getattr(layer, p).detach().clone()
        for n, layer in layers.items()
        for p in ("lora_P", "lora_lambda", "lora_Q")
    }
    return events, state


def test_training_with_growth_is_identical_with_checkpointing() -> None:
    events, state = _train("off")
    assert sum(sum(grown.values()) for _, grown, _ in events) > 0  # growth happened
    assert sum(sum(pruned.values()) for _, _, pruned in events) > 0
    events_gc, state_gc = _train("non_reentrant")
    assert events_gc == events
    assert state.keys() == state_gc.keys()
    for key, value in state.items():
        assert _close(state_gc[key], value), key
