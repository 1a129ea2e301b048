"""``adarank fit --resume`` rebuilds the frozen base from ``model.*`` and checks it.

Checkpoints omit the frozen base weights (format 2). A base that the config now builds
differently (say, changed model files) is refused with exit code 2, naming the layers, before
any file changes; checkpoints of format 1, which hold the base weights, still resume — to the
same result as the new format.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adarank.runs
from adarank.cli import main

# the planted task at its smallest: 2 blocks of 8×8 (a triplet costs 17 params)
PLANTED = [
    "planted",
    "data.ranks=[2,1]",
    "data.dims=8",
    "data.n_train=64",
    "data.n_val=32",
    "data.batch_size=16",
    "adapter.budget=27",
    "adapter.init_rank=2",
    "trainer.max_steps=6",
    "schedule.total_steps=10",
    "trainer.val_check_interval=3",
    "schedule.interval=2",
    "trainer.enable_progress_bar=false",
    "callbacks.snapshot_every_n_steps=0",
    "callbacks.checkpoint_every_n_steps=2",
    "logger.csv=false",
]


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADARANK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_resume_refuses_a_base_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run = tmp_path / "run"
    assert main(["fit", *PLANTED, f"run.dir={run}"]) == 0
    before = _files(run)
    build = adarank.runs.build_model

    def changed_base(cfg, data, **kwargs):  # as if the model's files had been replaced
        model = build(cfg, data, **kwargs)
        with torch.no_grad():
            model.blocks[1].weight.mul_(1.01)
        return model

    monkeypatch.setattr(adarank.runs, "build_model", changed_base)
    capsys.readouterr()
    assert main(["fit", "--resume", str(run), "trainer.max_steps=10"]) == 2
    err = capsys.readouterr().err
    assert "is not the one this checkpoint was trained on" in err, err
    assert "1 of 2 adapted layer(s) have other weights: 'blocks.1'" in err
    assert _files(run) == before
    monkeypatch.undo()
    assert main(["fit", "--resume", str(run), "trainer.max_steps=10"]) == 0


def test_a_checkpoint_holding_the_base_still_resumes(tmp_path: Path) -> None:
    new, old = tmp_path / "new", tmp_path / "old"
    assert main(["fit", *PLANTED, f"run.dir={new}"]) == 0
    shutil.copytree(new, old)
    path = old / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    base = adarank.runs.load_run(old).model.state_dict()
    frozen = {f"model.{k}": v for k, v in base.items() if k.endswith("base_layer.weight")}
    assert frozen and not set(frozen) & set(ckpt["state_dict"])  # the new format omits them
    ckpt["state_dict"].update(frozen)  # format 1: the base in the state dict, no fingerprint
    state = ckpt["adarank"]
    state.update(version=1)
    del state["base"], state["base_fingerprint"]
    torch.save(ckpt, path)
    for run in (new, old):
        assert main(["fit", "--resume", str(run), "trainer.max_steps=10"]) == 0
    a = load_file(new / "adapter" / "adapter.safetensors")
    b = load_file(old / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and a
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
    assert (new / "ranks.csv").read_text() == (old / "ranks.csv").read_text()
