"""Each shipped non-quickstart recipe runs end to end with small overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adarank.cli import main


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADARANK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_planted_recipe_reports_rank_recovery(tmp_path: Path) -> None:
    run_dir = tmp_path / "planted"
    code = main(
        [
            "fit",
            "planted",
            f"run.dir={run_dir}",
            "data.ranks=[4,2,1,0]",
            "data.dims=16",
            "data.n_train=512",
            "data.n_val=128",
            "adapter.budget=231",
            "adapter.init_rank=2",
            "trainer.max_steps=40",
            "trainer.val_check_interval=20",
            "schedule.interval=5",
            "trainer.enable_progress_bar=false",
            "callbacks.snapshot_every_n_steps=0",
        ]
    )
    assert code == 0
    s = _summary(run_dir)
    assert s["status"] == "ok" and s["steps"] == 40
    assert set(s["ranks"]) == {f"blocks.{i}" for i in range(4)}
    assert s["adapter_params"] <= 231  # 33 params per triplet, final budget 231 = 7 triplets
    truth = [4, 2, 1, 0]
    err = sum(abs(s["ranks"][f"blocks.{i}"] - t) for i, t in enumerate(truth)) / sum(truth)
    assert s["metrics"]["planted/rank_recovery_error"] == pytest.approx(err)
    assert "val/mse" in s["metrics"]


def test_lora_baseline_keeps_fixed_ranks(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"movie {i} was {'good' if i % 2 else 'bad'}", "label": i % 2})
            + "\n"
            for i in range(40)
        )
    )
    run_dir = tmp_path / "lora"
    code = main(
        [
            "fit",
            "lora_baseline",
            f"run.dir={run_dir}",
            "model.name_or_path=tiny-bert",
            f"data.train_file={data}",
            "data.val_size=8",
            "data.batch_size=8",
            "adapter.target_modules=[query]",
            "adapter.init_rank=3",
            "trainer.max_steps=4",
            "trainer.max_epochs=-1",
            "trainer.enable_progress_bar=false",
            "logger.wandb=false",
        ]
    )
    assert code == 0
    s = _summary(run_dir)
    assert s["param_budget"] is None and set(s["ranks"].values()) == {3}
    assert json.loads((run_dir / "labels.json").read_text())["labels"] == ["0", "1"]
    rows = (run_dir / "ranks.csv").read_text().splitlines()
    assert rows[0] == "step,layer,rank" and len(rows) == 3  # header + 2 query layers
    assert (run_dir / "rank_heatmap.png").stat().st_size > 0


def test_causal_lm_recipe_on_a_text_file(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(
        "\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(60))
    )
    run_dir = tmp_path / "lm"
    code = main(
        [
            "fit",
            "causal_lm",
            f"run.dir={run_dir}",
            f"data.train_file={text}",
            "data.block_size=32",
            "data.val_size=8",
            "data.batch_size=4",
            "adapter.budget=1500",
            "trainer.max_steps=6",
            "trainer.val_check_interval=6",
            "schedule.interval=2",
            "trainer.enable_progress_bar=false",
        ]
    )
    assert code == 0
    s = _summary(run_dir)
    assert s["status"] == "ok" and {"val/loss", "val/ppl"} <= set(s["metrics"])
    assert s["adapter_params"] <= 1500


def test_print_config_shows_the_resolved_config(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import yaml

    run_dir = tmp_path / "never"
    args = [
        "planted",
        f"run.dir={run_dir}",
        "trainer.max_steps=7",
        "data.seed=${trainer.max_steps}",
    ]
    assert main(["fit", "--print-config", *args]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_steps"] == 7 and printed["data"]["seed"] == 7  # resolved
    assert printed["model"]["_component_"] == "adarank.models.build_planted_model"  # fragments
    assert not run_dir.exists()  # nothing built, nothing written
    assert main(["fit", "--print-config", "planted", "optimizer.lr=-1"]) == 2
    captured = capsys.readouterr()
    assert "optimizer:" in captured.out and "optimizer.lr=-1: expected a positive" in captured.err
    assert main(["validate", "--print-config", *args]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "planted: ok" in out
