"""A tiny finished run directory, built with a plain PyTorch loop (no Lightning, no allocator).

Mimics what ``adarank fit`` writes: a BERT-named 2-layer model, adapters trained for a few
steps, two hand-made "allocation events" (prune some triplets, grow others), adapter snapshots,
``ranks.csv``, ``budget.csv``, ``summary.json``, ``config.yaml`` and the final ``adapter/``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from adarank.analysis.base_weights import save_base_weights
from adarank.modules import adapter_layers, add_adapters, save_adapter

D, FF = 16, 32


class TinyBert(nn.Module):
    """BERT-shaped module names (query/key/value/attention.output/intermediate/output)."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList()
        for _ in range(layers):
            blk = nn.Module()
            blk.attention = nn.Module()
            blk.attention.self = nn.Module()
            for n in ("query", "key", "value"):
                setattr(blk.attention.self, n, nn.Linear(D, D))
            blk.attention.output = nn.Module()
            blk.attention.output.dense = nn.Linear(D, D)
            blk.intermediate = nn.Module()
            blk.intermediate.dense = nn.Linear(D, FF)
            blk.output = nn.Module()
            blk.output.dense = nn.Linear(FF, D)
            self.encoder.layer.append(blk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        for blk in self.encoder.layer:
            s = blk.attention.self
            att = torch.softmax(s.query(x) @ s.key(x).transpose(1, 2) / D**0.5, dim=-1)
            x = x + blk.attention.output.dense(att @ s.value(x))
            x = x + blk.output.dense(torch.relu(blk.intermediate.dense(x)))
        return x


TARGETS = ["re:.*(query|key|value|dense)$"]


def build_run(
    run_dir: Path, seed: int = 0, steps: int = 24, events: tuple[int, ...] = (8, 16)
) -> TinyBert:
    """Train a tiny adapter and write a complete run directory; return the model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared CPU
    try:
        return _build_run(run_dir, seed, steps, events)
    finally:
        torch.set_num_threads(threads)


def _build_run(run_dir: Path, seed: int, steps: int, events: tuple[int, ...]) -> TinyBert:
    torch.manual_seed(seed)
    model = TinyBert()
    add_adapters(model, TARGETS, init_rank=4, scaling=1.0, seed=seed)
    layers = adapter_layers(model)
    teacher = TinyBert()
    x = torch.randn(8, 6, D)
    with torch.no_grad():
        y = teacher(x)
    gen = torch.Generator().manual_seed(seed + 1)
    ranks_rows, budget_rows = [], []
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(1, steps + 1):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in events:
            pruned = grown = 0
            for k, layer in enumerate(layers.values()):
                if k % 3 == 0 and layer.rank > 1:  # "deaths": drop the weakest triplet
                    layer.prune([int(layer.lora_lambda.abs().argmin())])
                    pruned += 1
                elif k % 3 == 1 and layer.rank < layer.max_rank:  # "births": two new ones
                    layer.grow(
                        torch.randn(layer.d_out, 2, generator=gen) / layer.d_out**0.5,
                        torch.randn(2, layer.d_in, generator=gen) / layer.d_in**0.5,
                    )
                    grown += 2
            live = sum(layer.live_params for layer in layers.values())
            budget_rows.append([step, int(live * 0.95), live, pruned, grown])
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
            save_adapter(model, run_dir / "snapshots" / f"step_{step:07d}")
        ranks_rows += [[step, n, layer.rank] for n, layer in layers.items()]
    save_adapter(model, run_dir / "adapter")
    with (run_dir / "ranks.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["step", "layer", "rank"], *ranks_rows])
    with (run_dir / "budget.csv").open("w", newline="") as f:
        csv.writer(f).writerows(
            [["step", "target_params", "live_params", "pruned", "grown"], *budget_rows]
        )
    (run_dir / "summary.json").write_text(
        json.dumps({"status": "finished", "param_budget": budget_rows[-1][1], "steps": steps})
    )
    (run_dir / "config.yaml").write_text(
        "model:\n  _component_: tests.analysis.conftest.TinyBert\n"
    )
    return model


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, TinyBert]:
    """A finished run directory (no base weights file) and its trained model."""
    run_dir = tmp_path_factory.mktemp("run_a")
    return run_dir, build_run(run_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_run_with_weights(tmp_path_factory) -> Path:
    """A finished run directory that also holds ``base_weights.safetensors``."""
    run_dir = tmp_path_factory.mktemp("run_w")
    model = build_run(run_dir, seed=1)
    save_base_weights(model, run_dir / "base_weights.safetensors")
    return run_dir


@pytest.fixture(scope="session")
def other_run(tmp_path_factory) -> Path:
    """A second run with the same layers and another seed (for ``--against``)."""
    run_dir = tmp_path_factory.mktemp("run_b")
    build_run(run_dir, seed=2)
    return run_dir


@pytest.fixture
def tiny_bert_cls() -> type[TinyBert]:
    """The tiny BERT-named model class."""
    return TinyBert
