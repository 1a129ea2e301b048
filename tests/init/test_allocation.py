"""Starting allocation from calibration spectra: follows a planted spectrum, respects the budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adarank import add_adapters
from adarank.init import initialize_adapters, normalized_energies, starting_ranks

PLANTED = {"l0": 6, "l1": 3, "l2": 1, "l3": 0}
DIMS = {"l0": 24, "l1": 24, "l2": 16, "l3": 32}  # d_in (mixed widths → mixed costs)


class Parallel(nn.Module):
    """Independent linear layers, each fed its own slice of the input."""

    def __init__(self) -> None:
        super().__init__()
        for n, d in DIMS.items():
            setattr(self, n, nn.Linear(d, 20))

    def forward(self, xs: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(getattr(self, n)(x).sum() for n, x in xs.items())


def planted_batches(num: int, seed: int = 0) -> list[tuple[dict]]:
    """Inputs whose second moment has k dominant directions (variance 50 vs 1) per layer."""
    g = torch.Generator().manual_seed(seed)
    bases = {n: torch.linalg.qr(torch.randn(d, d, generator=g)).Q for n, d in DIMS.items()}
    out = []
    for _ in range(num):
        xs = {}
        for n, d in DIMS.items():
            scale = torch.ones(d)
            scale[: PLANTED[n]] = 50**0.5
            xs[n] = (torch.randn(64, d, generator=g) * scale) @ bases[n].T
        out.append((xs,))
    return out


def test_starting_ranks_follow_a_planted_input_spectrum():
    model = Parallel()
    add_adapters(model, list(DIMS), 2)
    budget = sum(PLANTED[n] * (DIMS[n] + 20 + 1) for n in DIMS)
    report = initialize_adapters(
        model, "activations", planted_batches(8), allocate_ranks=True, init_budget=budget
    )
    assert report.ranks == PLANTED
    assert report.live_params == budget
    assert len(report.spectra["l0"]) == min(24, 32) and report.init_budget == budget
    # more budget goes to the noise directions, never below the planted ranks
    report2 = initialize_adapters(
        _fresh(), "lora", planted_batches(8), allocate_ranks=True, init_budget=2 * budget
    )
    assert all(report2.ranks[n] >= k for n, k in PLANTED.items())
    assert report2.live_params <= 2 * budget


def _fresh() -> Parallel:
    model = Parallel()
    add_adapters(model, list(DIMS), 2)
    return model


def test_default_budget_redistributes_the_uniform_rank():
    model = _fresh()
    uniform = sum(2 * (d + 21) for d in DIMS.values())
    report = initialize_adapters(model, "lora", planted_batches(4), allocate_ranks=True)
    assert report.init_budget == uniform
    assert uniform - max(d + 21 for d in DIMS.values()) < report.live_params <= uniform
    assert report.ranks["l0"] > report.ranks["l3"]  # 6 dominant directions vs none
    # resized lora layers get fresh orthonormal directions (zero-padded slots would be dead)
    for n, r in report.ranks.items():
        Q = getattr(model, n).lora_Q.detach().double()
        torch.testing.assert_close(Q @ Q.T, torch.eye(r, dtype=torch.float64), atol=1e-6, rtol=0)


def test_gradient_energy_signal_and_bounds():
    spectra = {"a": torch.tensor([3.0, 1.0, 0.1]), "b": torch.tensor([2.0, 2.0, 0.0])}
    e = normalized_energies(spectra, "gradient")
    total = 9 + 1 + 0.01 + 4 + 4
    torch.testing.assert_close(e["a"], torch.tensor([9, 1, 0.01], dtype=torch.float64) / total)
    ranks = starting_ranks(e, {"a": 10, "b": 10}, 30)
    assert ranks == {"a": 1, "b": 2}
    assert starting_ranks(e, {"a": 10, "b": 10}, 30, max_rank={"a": 3, "b": 1}) == {"a": 2, "b": 1}
    assert starting_ranks(e, {"a": 10, "b": 10}, 30, min_rank=1) == {"a": 1, "b": 2}
    with pytest.raises(ValueError, match="min_rank alone needs 40"):
        starting_ranks(e, {"a": 10, "b": 10}, 30, min_rank=2)
    with pytest.raises(ValueError, match="init_budget=-1"):
        starting_ranks(e, {"a": 10, "b": 10}, -1)
    with pytest.raises(ValueError, match="allocation signal 'loss'"):
        normalized_energies(spectra, "loss")
