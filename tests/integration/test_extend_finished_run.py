"""A finished run that stopped mid-epoch (``trainer.max_steps`` below ``schedule.total_steps``),
extended with ``fit --resume RUN trainer.max_steps=N``, equals one run straight to N.

64 training rows at batch 8 = 8 batches per epoch; the short run stops at step 10 (epoch 1,
batch 2 of 8: an extension that started the next epoch instead of finishing this one would see
other batches) or at step 8 (on the epoch boundary: Lightning's stopped-run counters made the
extension repeat a batch). Either way it would end with other adapter tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import _args, _write_csv
from test_resume_mid_epoch import assert_same_run

from adarank.cli import main

TOTAL = 24


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


@pytest.mark.slow  # three short CLI runs in process per case: ~20 s on 2 shared cores
@pytest.mark.parametrize("short_steps", [10, 8], ids=["mid_epoch", "epoch_boundary"])
def test_extending_a_stopped_run_equals_one_run(
    short_steps: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADARANK_CACHE_DIR", str(tmp_path / "cache"))
    data = _write_csv(tmp_path / "d.csv")
    full, short = tmp_path / "full", tmp_path / "short"
    assert main(["fit", *_fit_args(data, full, TOTAL)]) == 0
    assert main(["fit", *_fit_args(data, short, short_steps)]) == 0
    summary = json.loads((short / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == short_steps

    assert main(["fit", "--resume", str(short), f"trainer.max_steps={TOTAL}"]) == 0
    assert json.loads((short / "summary.json").read_text())["steps"] == TOTAL
    assert_same_run(full, short)
