"""``adarank fit ... trainer.strategy=sharded_base trainer.devices=2`` (2 CPU processes, gloo).

The planted task in small, with rank allocation on (ranks are pruned and grown): a sharded run
stopped after its first epoch (step 4) and resumed to step 12 from its checkpoint reaches the
same ranks, rank files and metrics as one process that does the same with the same global
batch, and each process held half of the frozen base. The pre-flight refuses the strategies
that cannot follow allocation, naming the value, before any process starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli_ddp import PLANTED as DDP_PLANTED

ROOT = Path(__file__).resolve().parents[2]

# the DDP CLI test's planted config (4 blocks of 8×8 from rank 3 each: the allocator must grow
# blocks.0 and prune the others; SGD keeps the processes comparable closely), with snapshots:
# writing them under a sharded base is part of what this test checks
PLANTED = [*DDP_PLANTED, "callbacks.snapshot_every_n_steps=6"]
SHARDED = ["trainer.strategy=sharded_base", "trainer.devices=2", "trainer.accelerator=cpu"]


def _fit(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["ADARANK_CACHE_DIR"] = str(cwd / "cache")
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "adarank.cli", "fit", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.slow  # two 2-process and two 1-process CLI runs: ~70 s on 2 loaded shared cores
def test_sharded_fit_and_resume_match_a_single_process(tmp_path: Path) -> None:
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    # 2 processes × 8 = the global batch of 16 of the single process
    proc = _fit(tmp_path, *PLANTED, *SHARDED, "data.batch_size=8", "trainer.max_steps=4",
                f"run.dir={sharded}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = _summary(sharded)
    assert first["steps"] == 4
    # each process held half of the frozen base (4 blocks of 8×8)
    assert first["sharded_base"]["processes"] == 2
    assert first["sharded_base"]["base_params"] == first["base_params"] == 256
    assert first["sharded_base"]["local_base_params"] == [128, 128]
    proc = _fit(tmp_path, "--resume", str(sharded), "trainer.max_steps=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(process 1)" not in proc.stderr

    # the same in one process (a resumed run is compared with a resumed run: on this task a
    # resume is not bit-identical to an uninterrupted run, the final val/loss moves by ~0.5%)
    proc = _fit(tmp_path, *PLANTED, "data.batch_size=16", "trainer.max_steps=4",
                f"run.dir={single}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _fit(tmp_path, "--resume", str(single), "trainer.max_steps=12")
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = _summary(sharded), _summary(single)
    assert a["status"] == b["status"] == "ok" and a["steps"] == b["steps"] == 12
    assert a["ranks"] == b["ranks"]
    for key, value in b["metrics"].items():
        assert a["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for name in ("ranks.csv", "budget.csv"):
        assert (sharded / name).read_text() == (single / name).read_text(), name
    # allocation was on: triplets were pruned and grown, before and after the resume
    rows = [line.split(",") for line in (single / "budget.csv").read_text().splitlines()[1:]]
    pruned = [int(r[0]) for r in rows if int(r[3])]
    grown = [int(r[0]) for r in rows if int(r[4])]
    assert pruned and grown, rows
    assert min(pruned + grown) < 4 < max(pruned + grown), rows
    ta = load_file(sharded / "adapter" / "adapter.safetensors")
    tb = load_file(single / "adapter" / "adapter.safetensors")
    assert ta.keys() == tb.keys() and ta
    # the retraction (on by default) turns rounding differences δ into δ / gap between close
    # singular values: 1e-4 (measured ≈ 1e-4 on entries of O(1); 1e-7 without it)
    for name, tensor in tb.items():
        assert torch.allclose(ta[name], tensor, atol=1e-4), name
    assert (sharded / "snapshots" / "step_0000006" / "adapter.safetensors").is_file()
    # the checkpoint is one adapter-only file (no frozen base weight in it)
    ckpt = torch.load(sharded / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 12 and ckpt["adarank"]["base"] == "omitted"
    assert ckpt["state_dict"] and not any("base_layer" in k for k in ckpt["state_dict"])


@pytest.mark.parametrize("strategy", ["deepspeed", "deepspeed_stage_3"])  # DDP subclasses
def test_strategies_owning_the_adapters_are_refused_with_allocation(
    tmp_path: Path, strategy: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from adarank.cli import main

    monkeypatch.setenv("ADARANK_CACHE_DIR", str(tmp_path / "cache"))
    argv = [*PLANTED, "trainer.max_steps=4", f"trainer.strategy={strategy}"]
    argv.append(f"run.dir={tmp_path / 'run'}")
    assert main(["fit", *argv]) == 2
    err = capsys.readouterr().err
    assert f"trainer.strategy={strategy!r}" in err and "trainer.strategy=sharded_base" in err
    assert not (tmp_path / "run").exists()
