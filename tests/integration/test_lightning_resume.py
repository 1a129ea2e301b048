"""SIGKILL mid-run, resume from ``last.ckpt``: same rank trajectory, bit-identical adapter."""

from __future__ import annotations

import signal

import torch
from _lightning_run import load_result, run_script


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = run_script(full, "--shuffle")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script(killed, "--shuffle", "--kill-at", "12")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (killed / "ckpt" / "last.ckpt").exists()
    assert not (killed / "result_rank0.pt").exists()  # it really died before finishing
    proc = run_script(killed, "--shuffle", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = load_result(full), load_result(killed)
    assert b["start_step"] == 8  # resumed from the step-8 checkpoint, not from scratch
    assert a["step"] == b["step"] == 32
    # the trajectory changed ranks before and after the checkpoint
    moved = [
        e["step"] for e in a["history"] if sum(e["pruned"].values()) + sum(e["grown"].values())
    ]
    assert min(moved) < 8 < max(moved)
    assert a["history"] == b["history"]  # same decisions, scores, budgets (wall times excluded)
    assert a["traj"] == b["traj"]  # RankTrajectoryLogger history restored from the checkpoint
    assert a["adapter"].keys() == b["adapter"].keys()
    for name, tensor in a["adapter"].items():
        assert torch.equal(tensor, b["adapter"][name]), name
    ranks_csv_full = (full / "traj" / "ranks.csv").read_text()
    assert ranks_csv_full == (killed / "traj" / "ranks.csv").read_text()
