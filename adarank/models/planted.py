"""Planted-rank regression task: where the right answer for rank allocation is known.

A frozen random base of parallel linear modules ``blocks.<i>`` (each with its own input and
output, so they cannot stand in for each other) and a teacher whose update of module i has a
planted rank ``r_i``::

    y_i = (W_i + U_i diag(s_i) V_iᵀ) x_i + ε,     ε ~ N(0, noise_std²),  s_i ~ U[1, 2]

Input covariance per module (``input_cov``):
    * ``white``      — C = I;
    * ``spiked``     — C = I + 9 Σ_{k<4} e_k e_kᵀ along random directions;
    * ``misaligned`` — the teacher's right directions V_i get variance 0.25, a random subspace
      orthogonal to them variance 4: the update lives where the inputs are weak.

Training loss: ``½ Σ_outputs (ŷ − y)²`` averaged over samples (unit output curvature). Held-out MSE
is the mean over all output elements; its floor is ``noise_std²``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["ParallelLinear", "PlantedTask", "build_planted_task", "parse_int_list", "INPUT_COVS"]

INPUT_COVS = ("white", "spiked", "misaligned")


def parse_int_list(value: str | int | Sequence[int], field: str = "value") -> list[int]:
    """``"16,8,4"`` or ``[16, 8, 4]`` → ``[16, 8, 4]`` with a clear error."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = [int(str(v).strip()) for v in items if str(v).strip() != ""]
    except ValueError:
        raise ValueError(
            f"{field}={value!r}: expected a comma-separated list of integers"
        ) from None
    if not out or any(v < 0 for v in out):
        raise ValueError(f"{field}={value!r}: expected a non-empty list of integers ≥ 0")
    return out


class ParallelLinear(nn.Module):
    """Independent linear modules applied to consecutive slices of the input."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.dims = list(dims)
        self.blocks = nn.ModuleList(nn.Linear(d, d, bias=False) for d in self.dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.dims, dim=-1)
        return torch.cat([blk(p) for blk, p in zip(self.blocks, parts)], dim=-1)


@dataclass
class PlantedTask:
    """A planted task instance (see module docstring)."""

    model: ParallelLinear
    ranks: list[int]
    dims: list[int]
    input_cov: str
    noise_std: float
    teacher: list[torch.Tensor]  # per module ΔW* (d, d)
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def module_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.dims))]

    @property
    def planted_params(self) -> int:
        """Σ r_i (2 d_i + 1): the adapter parameters that represent the teacher exactly."""
        return sum(r * (2 * d + 1) for r, d in zip(self.ranks, self.dims))

    @property
    def noise_floor(self) -> float:
        return self.noise_std**2

    def train_dataset(self) -> TensorDataset:
        return TensorDataset(self.x_train, self.y_train)

    def val_dataset(self) -> TensorDataset:
        return TensorDataset(self.x_val, self.y_val)

    @staticmethod
    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """½ Σ over outputs of the squared error, mean over samples."""
        return 0.5 * (pred - target).pow(2).sum(-1).mean()

    @torch.no_grad()
    def heldout_mse(self, model: nn.Module | None = None, batch_size: int = 4096) -> float:
        """Mean over held-out samples and outputs of (ŷ − y)²."""
        model = self.model if model is None else model
        was = model.training
        model.eval()
        total = 0.0
        for i in range(0, len(self.x_val), batch_size):
            pred = model(self.x_val[i : i + batch_size])
            total += float((pred - self.y_val[i : i + batch_size]).pow(2).sum())
        model.train(was)
        return total / self.y_val.numel()

    def rank_recovery_error(self, ranks: dict[str, int] | Sequence[int]) -> float:
        """Σ |r_alloc − r_true| / Σ r_true."""
        alloc = [ranks[n] for n in self.module_names] if isinstance(ranks, dict) else list(ranks)
        return sum(abs(a - t) for a, t in zip(alloc, self.ranks)) / max(1, sum(self.ranks))


def _orthonormal(d: int, k: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, max(k, 1), generator=g, dtype=torch.float64))
    return q[:, :k]


def build_planted_task(
    ranks: str | Sequence[int] = "16,8,8,4,4,2,2,1,1,1,1,0",
    dims: str | int | Sequence[int] = 64,
    *,
    input_cov: str = "white",
    noise_std: float = 0.1,
    n_train: int = 8192,
    n_val: int = 4096,
    seed: int = 0,
) -> PlantedTask:
    """Build a planted-rank task.

    Args:
        ranks: planted rank per module, e.g. ``"16,8,8,4,4,2,2,1,1,1,1,0"``.
        dims: one dimension for all modules or one per module (square modules d × d).
        input_cov: ``"white"``, ``"spiked"`` or ``"misaligned"``.
        noise_std: label noise standard deviation.
        n_train, n_val: sample counts.
        seed: seed of base weights, teacher and data.
    """
    ranks = parse_int_list(ranks, "ranks")
    dims = parse_int_list(dims, "dims")
    if len(dims) == 1:
        dims = dims * len(ranks)
    if len(dims) != len(ranks):
        raise ValueError(
            f"dims has {len(dims)} entries but ranks has {len(ranks)}; give one or one per module"
        )
    for i, (r, d) in enumerate(zip(ranks, dims)):
        if d < 1 or r > d:
            raise ValueError(
                f"module {i}: planted rank {r} must be ≤ its dimension {d} (and d ≥ 1)"
            )
    if input_cov not in INPUT_COVS:
        raise ValueError(f"input_cov={input_cov!r}: expected one of {INPUT_COVS}")
    if noise_std < 0 or n_train < 1 or n_val < 1:
        raise ValueError(
            f"need noise_std ≥ 0 and n_train, n_val ≥ 1 (got {noise_std}, {n_train}, {n_val})"
        )
    g = torch.Generator().manual_seed(seed)
    model = ParallelLinear(dims)
    teacher, mixers = [], []
    with torch.no_grad():
        for blk, r, d in zip(model.blocks, ranks, dims):
            blk.weight.copy_(torch.randn(d, d, generator=g) / d**0.5)
            blk.weight.requires_grad_(False)
            u, v = _orthonormal(d, r, g), _orthonormal(d, r, g)
            s = 1.0 + torch.rand(r, generator=g, dtype=torch.float64)
            teacher.append(((u * s) @ v.T).float())
            mixers.append(_input_mixer(d, v, input_cov, g))

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for blk, delta, mix, d in zip(model.blocks, teacher, mixers, dims):
            x = (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.T).float()
            y = x @ (blk.weight + delta).T + noise_std * torch.randn(n, d, generator=g)
            xs.append(x)
            ys.append(y)
        return torch.cat(xs, -1), torch.cat(ys, -1)

    x_train, y_train = sample(n_train)
    x_val, y_val = sample(n_val)
    return PlantedTask(
        model, ranks, dims, input_cov, noise_std, teacher, x_train, y_train, x_val, y_val
    )


def _input_mixer(d: int, v: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """Matrix L with L Lᵀ = C for the requested input covariance."""
    if kind == "white":
        return torch.eye(d, dtype=torch.float64)
    if kind == "spiked":
        basis = _orthonormal(d, min(4, d), g)
        return torch.eye(d, dtype=torch.float64) + (10**0.5 - 1) * basis @ basis.T
    # misaligned: variance 0.25 on the teacher's right directions, 4 on a random subspace ⟂ them
    q, _ = torch.linalg.qr(torch.cat([v, torch.randn(d, d, generator=g, dtype=torch.float64)], 1))
    scales = torch.ones(d, dtype=torch.float64)
    k = v.shape[1]
    scales[:k] = 0.5
    scales[k : k + max(4, k)] = 2.0
    return q[:, :d] * scales
