"""``adarank.lightning.sharded``: FSDP2 of the frozen base, replicated adapters.

Two CPU processes (gloo) run ``_sharded_worker.py``: the frozen parameters are sharded (each
process holds half of them), the trainable ones stay whole, the averaged adapter gradients of two
half batches equal the single-process gradient of the whole batch, before and after a prune and
a growth, and :func:`gathered` gives back the full base weights.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from adarank.lightning import ShardedBaseStrategy
from adarank.lightning.checkpointing import check_strategy

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_sharded_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("sharded")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out)],
            env=dict(env, RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_frozen_parameters_are_sharded_trainable_ones_replicated(results: list[dict]) -> None:
    for res in results:
        report = res["report"]
        assert sorted(report["sharded"]) == res["frozen"]
        assert sorted(report["replicated"]) == res["trainable"]
        assert any(n.endswith("lora_P") for n in report["replicated"])
        assert "head.weight" in report["replicated"]  # modules_to_save stay whole
        assert report["units"] == ["fc1.base_layer", "fc2.base_layer", ""]
        # each process holds half of every frozen tensor (all sizes here are even)
        assert report["global_numel"] == 6 * 8 + 8 + 8 * 16 + 16 + 16 * 8 + 8
        assert report["local_numel"] * 2 == report["global_numel"]
        assert res["sharded_numel"] == (report["local_numel"], report["global_numel"])
        assert res["after_type"] == "DTensor"  # still sharded after the gather below
        assert res["report_again"] == report  # sharding twice changes nothing


def test_averaged_gradients_equal_the_single_process_gradient(results: list[dict]) -> None:
    for res in results:
        ref, avg, local = res["ref_grads"], res["avg_grads"], res["local_grads"]
        assert ref.keys() == avg.keys() and len(ref) == 8
        for name, g in ref.items():
            assert g is not None and g.abs().max() > 0, name
            torch.testing.assert_close(avg[name], g, rtol=1e-5, atol=1e-7, msg=name)
        # a half batch alone gives another gradient: the all-reduce did the work
        assert max((local[n] - ref[n]).abs().max().item() for n in ref) > 1e-3
    a, b = (r["avg_grads"] for r in results)
    assert all(torch.equal(a[n], b[n]) for n in a)  # identical on both processes


def test_resized_adapters_need_no_resharding(results: list[dict]) -> None:
    for res in results:
        assert res["ranks"] == {"fc1": 4, "fc2": 3}  # 3 - 1 pruned + 2 grown
        ref, got = res["resized_ref_grads"], res["resized_grads"]
        assert tuple(got["fc1.lora_P"].shape) == (16, 4)
        for name, g in ref.items():
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)
        sharded_out, reference_out = res["outputs"]
        torch.testing.assert_close(sharded_out, reference_out)


def test_gathered_gives_the_full_base_weights(results: list[dict]) -> None:
    for res in results:
        assert res["gathered_type"] == "Parameter"
        assert torch.equal(res["gathered_weight"], res["ref_weight"])


def test_check_strategy_allows_the_sharded_base_and_refuses_deepspeed() -> None:
    check_strategy(SimpleNamespace(strategy=ShardedBaseStrategy()), allocation=True)
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # (needs no deepspeed package)
    with pytest.raises(ValueError, match="not supported with DeepSpeedStrategy.*'sharded_base'"):
        check_strategy(SimpleNamespace(strategy=deepspeed), allocation=True)
    with pytest.raises(TypeError, match="tensor_parallel_size"):
        ShardedBaseStrategy(tensor_parallel_size=2)
