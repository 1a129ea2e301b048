"""End-to-end ``adarank`` CLI on a random tiny BERT and a generated CSV (a few steps)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

from adarank.cli import main
from adarank.config import list_recipes

SUMMARY_KEYS = {"status", "param_budget", "trainable_params", "ranks", "metrics", "steps", "wall_s"}


def _write_csv(path: Path, n: int = 96, classes: tuple[str, ...] = ("neg", "pos")) -> Path:
    rng = random.Random(0)
    vocab = {"neg": ["dull", "awful", "boring"], "pos": ["great", "fun", "lovely"]}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        for i in range(n):
            y = classes[i % len(classes)]
            w.writerow([" ".join(rng.choice(vocab.get(y, ["meh"])) for _ in range(4)), y])
    return path


def _args(csv_path: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "quickstart",
        "model.name_or_path=tiny-bert",
        f"data.train_file={csv_path}",
        "data.text_column=review",
        "data.label_column=sentiment",
        "data.val_size=32",
        "data.batch_size=8",
        "data.max_length=16",
        "adapter.target_modules=[query,value]",
        "adapter.init_rank=4",
        "adapter.budget=600",
        "schedule.interval=2",
        "schedule.total_steps=12",
        "trainer.max_epochs=-1",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=2",
        "trainer.enable_progress_bar=false",
        "callbacks.snapshot_every_n_steps=3",
        f"run.dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def fitted(workdir: Path) -> Path:
    """One short run (6 of 12 scheduled steps) with CSV + W&B offline logging."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ADARANK_CACHE_DIR", str(workdir / "cache"))
    mp.setenv("WANDB_MODE", "offline")
    run_dir = workdir / "run"
    code = main(["fit", *_args(_write_csv(workdir / "d.csv"), run_dir)])
    mp.undo()
    assert code == 0
    return run_dir


def test_fit_writes_every_artefact(fitted: Path) -> None:
    for name in (
        "config.yaml",
        "summary.json",
        "labels.json",
        "ranks.csv",
        "budget.csv",
        "rank_heatmap.png",
        "adapter/adapter.safetensors",
        "adapter/adapter_config.json",
        "checkpoints/last.ckpt",
        "logs/csv",
    ):
        assert (fitted / name).exists(), name
    assert sorted(p.name for p in (fitted / "snapshots").iterdir())[:2] == [
        "step_0000003",
        "step_0000006",
    ]
    assert list((fitted / "logs" / "wandb").glob("offline-run-*"))
    summary = json.loads((fitted / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["status"] == "ok"
    assert summary["steps"] == 6 and summary["param_budget"] == 600
    assert set(summary["ranks"]) == {
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")
    }
    # each adapted module is 32×32: a triplet costs 65 params
    assert summary["adapter_params"] == 65 * sum(summary["ranks"].values())
    assert summary["trainable_params"] == summary["adapter_params"] + 66  # + classifier 32·2+2
    assert {"val/acc", "val/loss"} <= set(summary["metrics"])
    cfg_text = (fitted / "config.yaml").read_text()
    assert "tiny-bert" in cfg_text and "${" not in cfg_text  # resolved


def test_load_run_reproduces_validation_accuracy(fitted: Path) -> None:
    from adarank.modules import count_parameters
    from adarank.runs import load_run

    summary = json.loads((fitted / "summary.json").read_text())
    run = load_run(fitted, load_data=True)
    assert run.task == "classification" and run.labels == ["neg", "pos"]
    assert count_parameters(run.model)["adapter"] == summary["adapter_params"]
    correct = total = 0
    with torch.no_grad():
        for batch in run.data.val_dataloader():
            labels = batch.pop("labels")
            pred = run.model(**batch).logits.argmax(-1)
            correct += int((pred == labels).sum())
            total += len(labels)
    assert correct / total == pytest.approx(summary["metrics"]["val/acc"], abs=1e-6)


def test_resume_continues_to_the_scheduled_end(
    fitted: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADARANK_CACHE_DIR", str(workdir / "cache"))
    before = (fitted / "ranks.csv").read_text().splitlines()
    code = main(["fit", "--resume", str(fitted), "trainer.max_steps=12", "logger.wandb=false"])
    assert code == 0
    summary = json.loads((fitted / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 12
    after = (fitted / "ranks.csv").read_text().splitlines()
    assert after[: len(before)] == before  # trajectory kept, then extended
    assert max(int(line.split(",")[0]) for line in after[1:]) > 6


def test_recipes_lists_all(capsys: pytest.CaptureFixture) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(list_recipes()) >= 4
    for name, desc, _ in list_recipes():
        assert any(line.startswith(name) and desc in line for line in out)


def test_validate_ok(capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", "quickstart", "trainer.max_steps=20", "adapter.budget=0.5%"]) == 0
    assert "quickstart: ok" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["adapter.bugdet=5"], "adapter.bugdet=5: unknown key"),
        (["adapter.budget=lots"], "adapter.budget='lots': expected a parameter count"),
        (["data.train_file=/no/file.csv"], "data.train_file='/no/file.csv': file not found"),
        (["data.text_column=body"], "has no column 'body'"),
        (
            ["schedule.warmup_steps=8", "schedule.final_steps=5"],
            "warmup_steps (8) + final_steps (5) must be smaller than total_steps (12)",
        ),
        (["adapter.budget=1000000"], "adapter.budget=1000000 = 1000000 params exceeds the"),
        (["ONECLASS"], "only one class ('neg')"),
        (["trainer.max_stepz=1"], "unknown lightning.Trainer argument"),
    ],
)
def test_bad_input_exits_2_without_run_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, extra, message
) -> None:
    monkeypatch.setenv("ADARANK_CACHE_DIR", str(tmp_path / "cache"))
    data = _write_csv(tmp_path / "d.csv")
    if extra == ["ONECLASS"]:
        data, extra = _write_csv(tmp_path / "one.csv", classes=("neg",)), []
    run_dir = tmp_path / "run"
    assert main(["fit", *_args(data, run_dir, "logger.wandb=false", *extra)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not run_dir.exists()


def test_existing_run_dir_and_bad_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("x")
    assert main(["fit", *_args(_write_csv(tmp_path / "d.csv"), run_dir)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == ["keep.txt"]
    assert main(["fit", "--resume", str(run_dir)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    assert main(["fit", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == ["keep.txt"]
