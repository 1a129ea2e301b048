"""RankTrajectoryLogger: files and logged metrics agree with the controller's history."""

from __future__ import annotations

import csv

import pytest
import torch
from _tiny import fit_tiny
from lightning.pytorch.loggers import CSVLogger

from adarank.lightning import RankTrajectoryLogger
from adarank.lightning.trajectory_io import (
    event_record,
    read_ranks_csv,
    render_heatmap_from_csv,
)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_files_and_logged_metrics_match_history(tmp_path):
    cb = RankTrajectoryLogger(tmp_path / "run")
    logger = CSVLogger(tmp_path / "logs", name="t")
    module, _ = fit_tiny(steps=20, callbacks=[cb], logger=logger)
    events = [event_record(e) for e in module.controller.history]
    assert cb.history == events and sum(e.n_grown + e.n_pruned for e in module.controller.history)
    # ranks.csv: one row per (event, layer)
    ranks = _rows(tmp_path / "run" / "ranks.csv")
    assert [(int(r["step"]), r["layer"], int(r["rank"])) for r in ranks] == [
        (e["step"], n, r) for e in events for n, r in e["ranks"].items()
    ]
    budget = _rows(tmp_path / "run" / "budget.csv")
    assert [int(r["step"]) for r in budget] == [e["step"] for e in events]
    assert [int(r["live_params"]) for r in budget] == [e["live_params"] for e in events]
    assert [int(r["grown"]) for r in budget] == [sum(e["grown"].values()) for e in events]
    png = (tmp_path / "run" / "rank_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # every logger got the metrics at the event's step
    logger.save()
    logged = _rows(tmp_path / "logs" / "t" / "version_0" / "metrics.csv")
    for e in events:
        row = next(r for r in logged if r.get("rank/blocks.0") and int(r["step"]) == e["step"])
        for name, rank in e["ranks"].items():
            assert float(row[f"rank/{name}"]) == rank
        assert float(row["budget/target_params"]) == e["target_params"]
        assert float(row["alloc/pruned"]) == sum(e["pruned"].values())
        assert float(row["score/max"]) == pytest.approx(e["score_summary"]["max"])


def test_callback_never_changes_the_weights(tmp_path):
    with_cb, _ = fit_tiny(steps=14, callbacks=[RankTrajectoryLogger(tmp_path)])
    without, _ = fit_tiny(steps=14)
    a, b = with_cb.model.state_dict(), without.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_heatmap_recoverable_from_csv_and_state_roundtrip(tmp_path):
    cb = RankTrajectoryLogger(tmp_path)
    fit_tiny(steps=10, callbacks=[cb])
    (tmp_path / "rank_heatmap.png").unlink()
    render_heatmap_from_csv(tmp_path / "ranks.csv", tmp_path / "rank_heatmap.png")
    assert (tmp_path / "rank_heatmap.png").stat().st_size > 1000
    assert [r["ranks"] for r in read_ranks_csv(tmp_path / "ranks.csv")] == [
        e["ranks"] for e in cb.history
    ]
    other = RankTrajectoryLogger()
    other.load_state_dict(cb.state_dict())
    assert other.history == cb.history


def test_argument_validation():
    with pytest.raises(ValueError, match="heatmap_every_n_events=-1"):
        RankTrajectoryLogger(heatmap_every_n_events=-1)
    with pytest.raises(TypeError, match="run_dir"):
        RankTrajectoryLogger(run_dir=3)
    with pytest.raises(TypeError, match="AdaRankModule"):
        RankTrajectoryLogger().setup(None, torch.nn.Linear(1, 1), "fit")
