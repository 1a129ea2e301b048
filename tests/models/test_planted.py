import json
import subprocess
import sys

import pytest
import torch

from adarank.models.planted import build_planted_task
from adarank.models.planted_fit import fit_planted, uniform_rank_for_budget


def test_teacher_has_planted_ranks_and_data_follow_it():
    task = build_planted_task("3,1,0", "8,12,6", noise_std=0.0, n_train=64, n_val=32, seed=1)
    assert [int(torch.linalg.matrix_rank(t)) for t in task.teacher] == [3, 1, 0]
    assert task.planted_params == 3 * 17 + 1 * 25
    pred = torch.cat(
        [
            x @ (b.weight + t).T
            for b, t, x in zip(
                task.model.blocks, task.teacher, torch.split(task.x_val, task.dims, -1)
            )
        ],
        -1,
    )
    assert torch.allclose(pred, task.y_val, atol=1e-5)
    assert task.rank_recovery_error({"blocks.0": 2, "blocks.1": 1, "blocks.2": 1}) == pytest.approx(
        2 / 4
    )


def test_misaligned_inputs_are_weak_along_teacher_directions():
    task = build_planted_task("4", 32, input_cov="misaligned", n_train=8192, n_val=8, seed=0)
    x = task.x_train.double()
    cov = x.T @ x / len(x)
    _, _, vh = torch.linalg.svd(task.teacher[0].double())
    along_teacher = torch.diagonal(vh[:4] @ cov @ vh[:4].T).mean()
    assert along_teacher < 0.4 and torch.linalg.eigvalsh(cov).max() > 3.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ranks="3,x"), "ranks"),
        (dict(ranks="9", dims=8), "planted rank 9"),
        (dict(dims="8,8"), "dims has"),
        (dict(input_cov="pink"), "input_cov"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_planted_task(**{"ranks": "2,1,0", **kwargs})


def test_adaptive_recovers_ranks_where_uniform_cannot():
    task = build_planted_task("6,2,1,0", 16, n_train=2048, n_val=512, seed=0)
    ada = fit_planted(task, "adaptive", steps=500, seed=0)
    uni = fit_planted(task, "uniform", steps=500, seed=0)
    assert uniform_rank_for_budget(task, task.planted_params) == 2
    assert ada["live_params"] <= task.planted_params == ada["param_budget"]
    assert ada["rank_recovery_error"] <= 0.15
    assert ada["excess_mse"] < 0.3 * uni["excess_mse"]


def test_bench_script_smoke(tmp_path):
    out = tmp_path / "planted.json"
    subprocess.run(
        [sys.executable, "scripts/bench_planted.py", "--smoke", "--json", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    data = json.loads(out.read_text())
    keys = {
        "method",
        "seed",
        "heldout_mse",
        "excess_mse",
        "ranks",
        "rank_recovery_error",
        "live_params",
        "param_budget",
        "wall_s",
    }
    assert {r["method"] for r in data["runs"]} == {"adaptive", "uniform"}
    assert all(keys <= set(r) for r in data["runs"])
