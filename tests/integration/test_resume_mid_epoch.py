"""``adarank fit``, SIGKILLed after a mid-epoch checkpoint, then ``fit --resume``: bit-identical.

Three subprocesses on a random tiny BERT and a generated CSV (64 training rows, batch 8: 8
batches per epoch, 3 epochs = 24 steps, a checkpoint every 5 steps):

* ``full``: ``python -m adarank.cli fit ...`` to the end.
* ``killed``: the same command, except that a callback (installed by wrapping
  ``build_callbacks``; nothing else differs) blocks forever at step 11, so the test can poll
  ``checkpoints/last.ckpt`` until it holds step 10 (epoch 1, batch 2 of 8) and SIGKILL it then;
  ``python -m adarank.cli fit --resume`` finishes it.

ranks.csv, budget.csv and every tensor of adapter.safetensors must be identical.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import _args, _write_csv

ROOT = Path(__file__).resolve().parents[2]
EPOCH_BATCHES, STALL_AT = 8, 11

STALL = f"""
import sys, time
import lightning.pytorch as pl
import adarank.config.trainer as t

class Stall(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == {STALL_AT}:
            time.sleep(3600)

build = t.build_callbacks
t.build_callbacks = lambda cfg, run_dir: [*build(cfg, run_dir), Stall()]
from adarank.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["ADARANK_CACHE_DIR"] = str(tmp / "cache")
    env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    return env


def _fit_args(csv_path: Path, run_dir: Path) -> list[str]:
    args = _args(csv_path, run_dir, "logger.wandb=false")
    replace = {
        "schedule.total_steps": "24",
        "trainer.max_steps": "-1",
        "trainer.max_epochs": "3",
        "callbacks.snapshot_every_n_steps": "0",
    }
    args = [a for a in args if a.split("=")[0] not in replace]
    extra = [f"{k}={v}" for k, v in replace.items()]
    return [
        *args,
        *extra,
        "callbacks.checkpoint_every_n_steps=5",
        "trainer.deterministic=true",
    ]


def assert_same_run(one: Path, other: Path) -> None:
    """Two finished runs wrote the same rank files and the same adapter, tensor for tensor."""
    for name in ("ranks.csv", "budget.csv"):
        assert (one / name).read_text() == (other / name).read_text(), name
    a = load_file(one / "adapter" / "adapter.safetensors")
    b = load_file(other / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and a
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(ROOT))


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError, OSError):
        return None  # not written yet, or caught mid-write


def _kill_after_mid_epoch_checkpoint(cmd: list[str], env: dict[str, str], ckpt: Path) -> int:
    proc = subprocess.Popen(
        cmd, env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            step = _checkpoint_step(ckpt)
            if step is not None and step > EPOCH_BATCHES and step % EPOCH_BATCHES:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                return step
            time.sleep(0.2)
        raise AssertionError("no mid-epoch checkpoint within 240 s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()


@pytest.mark.slow  # three CLI subprocesses: ~100 s on 2 shared cores
def test_sigkill_mid_epoch_and_resume_is_bit_identical(tmp_path: Path) -> None:
    env = _env(tmp_path)
    data = _write_csv(tmp_path / "d.csv")
    full, killed = tmp_path / "full", tmp_path / "killed"
    cli = [sys.executable, "-m", "adarank.cli", "fit"]

    proc = _run([*cli, *_fit_args(data, full)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    stalled = [sys.executable, "-c", STALL, "fit", *_fit_args(data, killed)]
    step = _kill_after_mid_epoch_checkpoint(stalled, env, killed / "checkpoints" / "last.ckpt")
    assert step == 10  # epoch 1, batch 2: the data order must continue mid-epoch
    assert not (killed / "adapter").exists()  # it really died before finishing
    assert not (killed / "summary.json").exists()  # no cleanup ran either

    proc = _run([*cli, "--resume", str(killed)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not resumable" not in proc.stderr

    # the allocation changed ranks both before and after the checkpoint
    rows = (full / "ranks.csv").read_text().splitlines()
    steps = sorted({int(r.split(",")[0]) for r in rows[1:]})
    assert steps[0] < step < steps[-1], steps
    assert_same_run(full, killed)
