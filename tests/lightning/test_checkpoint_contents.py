"""Checkpoints hold only what training changes; resuming rebuilds and checks the frozen base.

A random model whose frozen base (4 linear maps 128×128, 65,536 parameters) dwarfs its
adapters (rank 2: 2,056 parameters) and a trained ``modules_to_save`` LayerNorm.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from adarank.lightning import AdaRankModule
from adarank.lightning.checkpointing import frozen_keys
from adarank.modules import adapter_layers, add_adapters

D, K = 128, 4


class Net(nn.Module):
    """K parallel linear maps, a trained LayerNorm and a (frozen) buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(K))
        self.norm = nn.LayerNorm(D)
        self.register_buffer("gain", torch.full((D,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, D)
        y = torch.stack([blk(x[:, i]) for i, blk in enumerate(self.blocks)], dim=1)
        return self.norm(y) * self.gain


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Net()
    for p in model.parameters():
        p.requires_grad_(False)
    add_adapters(model, "re:blocks\\.\\d+", init_rank=2, seed=0, modules_to_save=["norm"])
    return model


def _module(model: nn.Module) -> AdaRankModule:
    return AdaRankModule(model, "regression", budget=None, lr=1e-2)


def _fit_and_save(path, model: nn.Module | None = None, steps: int = 3) -> AdaRankModule:
    pl.seed_everything(0, verbose=False)
    module = _module(model if model is not None else _model())
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, K, D, generator=g), torch.randn(16, K, D))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    trainer.save_checkpoint(path)
    return module


def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def test_checkpoint_holds_only_what_training_changes(tmp_path) -> None:
    module = _fit_and_save(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=True)
    base = {f"model.blocks.{i}.base_layer.weight" for i in range(K)}
    assert frozen_keys(module) == base
    assert set(ckpt["state_dict"]) == set(module.state_dict()) - base
    assert {"model.gain", "model.norm.weight", "model.blocks.0.shift_P"} <= set(ckpt["state_dict"])
    assert ckpt["adarank"]["base"] == "omitted"
    # size: at most 3× the trained tensors and their optimizer state (here about 1.5×), while
    # the base alone is 2.4× that
    trained = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    wanted = trained + _nbytes(ckpt["optimizer_states"])
    assert 2 * trained <= _nbytes(ckpt["optimizer_states"])  # AdamW: two moments
    assert os.path.getsize(tmp_path / "c.ckpt") <= 3 * wanted
    assert K * D * D * 4 > 2 * wanted


def test_resume_rebuilds_the_same_state(tmp_path) -> None:
    module = _fit_and_save(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=True)
    fresh = _module(_model())
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])  # the base is missing: rebuilt, not loaded
    own, new = module.state_dict(), fresh.state_dict()
    assert own.keys() == new.keys()
    for key, value in own.items():
        assert torch.equal(value, new[key]), key


def test_a_different_base_is_refused_with_the_layers_named(tmp_path) -> None:
    _fit_and_save(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=True)
    other = _model()
    with torch.no_grad():
        other.blocks[2].base_layer.weight.mul_(1.01)
    with pytest.raises(
        ValueError, match=r"1 of 4 adapted layer\(s\) have other weights: 'blocks.2'"
    ):
        _module(other).on_load_checkpoint(ckpt)
    del ckpt["adarank"]["base_fingerprint"]
    with pytest.raises(ValueError, match="no 'base_fingerprint'"):
        _module(_model()).on_load_checkpoint(ckpt)


def test_missing_tensors_other_than_the_base_are_refused(tmp_path) -> None:
    _fit_and_save(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=True)
    fresh = _module(_model())
    fresh.on_load_checkpoint(ckpt)
    del ckpt["state_dict"]["model.norm.bias"]
    with pytest.raises(ValueError, match=r"1 tensors missing .*model\.norm\.bias"):
        fresh.load_state_dict(ckpt["state_dict"])
    fresh.load_state_dict(ckpt["state_dict"], strict=False)  # as torch: non-strict loads


def test_a_shifted_base_is_rebuilt_from_the_saved_shift(tmp_path) -> None:
    g = torch.Generator().manual_seed(3)
    model = _model()
    layer = adapter_layers(model)["blocks.1"]
    layer.shift_base(torch.randn(D, 2, generator=g) * 0.1, torch.randn(2, D, generator=g) * 0.1)
    module = _fit_and_save(tmp_path / "c.ckpt", model)
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=True)
    for shift in (None, 0.2):  # rebuilt without a shift, or with another one
        rebuilt = _model()
        if shift is not None:
            other = adapter_layers(rebuilt)["blocks.1"]
            other.shift_base(torch.full((D, 1), shift), torch.full((1, D), shift))
        fresh = _module(rebuilt)
        fresh.on_load_checkpoint(ckpt)  # the fingerprint is of the original W0: it matches
        fresh.load_state_dict(ckpt["state_dict"])
        for key, value in module.state_dict().items():
            torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=1e-6)
