"""A finished run that stopped mid-epoch (``trainer.max_steps`` below ``schedule.total_steps``),
extended with ``fit --resume RUN trainer.max_steps=N``, equals one run straight to N.

64 training rows at batch 8 = 8 batches per epoch; the short run stops at step 10 (epoch 1,
batch 2 of 8), so an extension that started the next epoch instead of finishing this one would
see other batches and end with other adapter tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import _args, _write_csv

from adarank.cli import main

TOTAL, SHORT = 24, 10


def _fit_args(csv_path: Path, run_dir: Path, max_steps: int) -> list[str]:
    replace = {
        "schedule.total_steps": str(TOTAL),
        "trainer.max_steps": str(max_steps),
        "trainer.max_epochs": "-1",
        "callbacks.snapshot_every_n_steps": "0",
    }
    args = [
        a for a in _args(csv_path, run_dir, "logger.wandb=false") if a.split("=")[0] not in replace
    ]
    return [*args, *(f"{k}={v}" for k, v in replace.items()), "trainer.deterministic=true"]


@pytest.mark.slow  # three short CLI runs in process: ~40 s on 2 shared cores
def test_extending_a_run_finished_mid_epoch_equals_one_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADARANK_CACHE_DIR", str(tmp_path / "cache"))
    data = _write_csv(tmp_path / "d.csv")
    full, short = tmp_path / "full", tmp_path / "short"
    assert main(["fit", *_fit_args(data, full, TOTAL)]) == 0
    assert main(["fit", *_fit_args(data, short, SHORT)]) == 0
    summary = json.loads((short / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == SHORT

    assert main(["fit", "--resume", str(short), f"trainer.max_steps={TOTAL}"]) == 0
    assert json.loads((short / "summary.json").read_text())["steps"] == TOTAL
    for name in ("ranks.csv", "budget.csv"):
        assert (full / name).read_text() == (short / name).read_text(), name
    a = load_file(full / "adapter" / "adapter.safetensors")
    b = load_file(short / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and a
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
