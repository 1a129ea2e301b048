"""`adapter.init=...` through the CLI: every data-aware strategy trains end to end and the
saved adapter reproduces the trained model on a fresh base (shifts included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import _args, _write_csv

from adarank.cli import main


@pytest.mark.parametrize("strategy", ["svd", "covariance", "activations", "gradient"])
def test_fit_with_data_aware_init(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    monkeypatch.setenv("ADARANK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = tmp_path / "run"
    args = _args(
        _write_csv(tmp_path / "d.csv"),
        run_dir,
        f"adapter.init={strategy}",
        "adapter.init_args={num_batches: 2}",
    )
    assert main(["fit", *args]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["init"] == strategy

    from adarank.runs import load_run

    run = load_run(run_dir)  # rebuilds the ORIGINAL base and applies the saved adapter (+ shift)
    batch = {
        "input_ids": torch.randint(5, 60, (4, 12)),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
    }
    with torch.no_grad():
        logits = run.model(**batch).logits
    assert torch.isfinite(logits).all()
    if strategy in ("svd", "covariance"):
        shifted = [
            la
            for la in run.model.modules()
            if getattr(la, "shift_P", None) is not None and la.shift_P.shape[1]
        ]
        assert shifted, "data-aware init must record the base shift in the adapter"
