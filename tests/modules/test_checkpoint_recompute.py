"""SVDLoRALinear under torch.utils.checkpoint: statistics and captured gradients (the capture
hooks of adarank.allocation.capture) count once.

A small MLP (the first layer at rank 0 so that its output needs no gradient of its own) runs
plain, with non-reentrant and with reentrant checkpointing. The captured ``G = Σ δ xᵀ`` must
equal the weight gradient that autograd computes for an un-adapted copy whose weights require
grad (a reference computed another way), and Σ(Qx)² must equal the value from the inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from adarank.allocation import install_capture
from adarank.modules import add_adapters
from adarank.modules.svd_lora import in_backward_pass


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


class Checkpointed(nn.Module):
    def __init__(self, body: nn.Module, mode: str) -> None:
        super().__init__()
        self.body, self.mode = body, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return self.body(x)
        return checkpoint(self.body, x, use_reentrant=self.mode == "reentrant")


def _reference(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weight gradients of the plain MLP (= the ΔW gradients at λ = 0 for every layer)."""
    mlp = _mlp()
    mlp(x).pow(2).sum().backward()
    return {name: mlp.get_submodule(name).weight.grad for name in ("0", "2", "4")}


@pytest.mark.parametrize("mode", ["off", "non_reentrant", "reentrant"])
def test_capture_and_stats_count_each_token_once(mode: str) -> None:
    x = torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(3))
    ref = _reference(x)
    body = _mlp()
    layers = add_adapters(body, ["0", "2", "4"], {"0": 0, "2": 3, "4": 2}, seed=0)
    model = Checkpointed(body, mode).train()
    captures = install_capture(layers, max_tokens=None)
    for cap in captures.values():
        cap.capture_gradient(True)
    # reentrant checkpointing back-propagates only from inputs that need a gradient (what
    # transformers' enable_input_require_grads does for a frozen embedding)
    model(x.clone().requires_grad_(mode == "reentrant")).pow(2).sum().backward()
    for name, layer in layers.items():
        cap = captures[name]
        assert cap.captured_tokens == 35, (mode, name)
        assert torch.allclose(cap.captured_grad, ref[name], rtol=1e-5, atol=1e-6), (mode, name)
        assert cap.captured_inputs().shape == (35, layer.d_in)
    h = torch.tanh(body[0](x.reshape(-1, 6)))  # input of layer "2" (layer "0" has rank 0)
    z_sq = (h @ layers["2"].lora_Q.detach().T).pow(2).sum(0)
    assert captures["2"].z_count == 35
    assert torch.allclose(captures["2"].z_sq_sum, z_sq, rtol=1e-5)


def test_in_backward_pass_only_inside_backward() -> None:
    seen = []
    w = torch.ones(3, requires_grad=True)
    w.register_hook(lambda g: seen.append(in_backward_pass()))
    assert not in_backward_pass()
    (w * 2).sum().backward()
    assert seen == [True] and not in_backward_pass()
