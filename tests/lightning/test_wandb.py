"""W&B helper: mode resolution (no key → offline) and offline run files with rank metrics."""

from __future__ import annotations

import json

import pytest
from _tiny import fit_tiny

from adarank.lightning import RankTrajectoryLogger, make_wandb_logger, resolve_wandb_mode
from adarank.lightning.wandb_utils import wandb_api_key_configured


@pytest.fixture
def no_key(monkeypatch, tmp_path):
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_offline_without_key_online_with_key(no_key, monkeypatch):
    assert not wandb_api_key_configured()
    assert resolve_wandb_mode() == "offline"
    no_key.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    assert wandb_api_key_configured() and resolve_wandb_mode() == "online"
    no_key.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode() == "online"
    assert resolve_wandb_mode("offline") == "offline"  # the user's choice wins


def test_wandb_mode_env_is_respected(no_key, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes'"):
        resolve_wandb_mode()
    with pytest.raises(ValueError, match="mode='cloud'"):
        resolve_wandb_mode("cloud")


def test_offline_run_files_contain_rank_metrics(no_key, tmp_path):
    import wandb

    logger = make_wandb_logger("adarank-test", tmp_path / "run")
    cb = RankTrajectoryLogger(tmp_path / "run")
    module, _ = fit_tiny(steps=12, callbacks=[cb], logger=logger)
    logger.experiment.finish()
    wandb.teardown()  # stop wandb's service so the offline transaction log is flushed
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = runs[0] / "files"
    # the trajectory table holds exactly the controller's history
    (table,) = (files / "media" / "table" / "rank").glob("trajectory_*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"] == ["step", "layer", "rank"]
    expected = [[e.step, n, r] for e in module.controller.history for n, r in e.ranks.items()]
    assert data["data"] == expected
    assert list((files / "media" / "images" / "rank").glob("heatmap_*.png"))
    # the scalar history (binary .wandb log) carries the per-step rank and budget keys
    (log,) = runs[0].glob("run-*.wandb")
    raw = log.read_bytes()
    for key in ("rank/blocks.0", "rank/blocks.3", "budget/live_params", "alloc/grown", "score/max"):
        assert key.encode() in raw, key


def test_disabled_mode_writes_nothing(no_key, tmp_path):
    import wandb

    logger = make_wandb_logger("adarank-test", tmp_path / "run", mode="disabled")
    fit_tiny(steps=8, callbacks=[RankTrajectoryLogger(tmp_path / "run")], logger=logger)
    wandb.finish()
    assert not list((tmp_path / "run").rglob("offline-run-*"))
