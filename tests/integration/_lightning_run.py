"""Helpers to run ``_lightning_script.py`` in a subprocess and read its results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("_lightning_script.py")
ROOT = Path(__file__).resolve().parents[2]


def run_script(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOBUDGET", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
    )


def load_result(out: Path, rank: int = 0) -> dict:
    return torch.load(out / f"result_rank{rank}.pt", weights_only=True)


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0 for k in a)
