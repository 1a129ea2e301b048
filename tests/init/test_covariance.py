"""Streaming second moments, Chan merges, shrinkage and the Nyström sketch vs direct formulas."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from adarank.init import (
    NystromSketch,
    SecondMomentAccumulator,
    ledoit_wolf_intensity,
    oas_intensity,
)


def _data(n: int, d: int, seed: int = 0, shift: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ A + shift


def test_streaming_matches_direct_batch_computation():
    x = _data(300, 12)
    acc = SecondMomentAccumulator(12)
    for chunk in torch.split(x, [1, 50, 7, 142, 100]):
        acc.update(chunk.float() if chunk.shape[0] == 7 else chunk)  # any float dtype
    x32 = torch.cat([x[:51], x[51:58].float().double(), x[58:]])
    torch.testing.assert_close(acc.second_moment(), x32.T @ x32 / 300, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        acc.covariance(), torch.cov(x32.T, correction=0), rtol=1e-9, atol=1e-12
    )
    norm4 = (x32.pow(2).sum(1) ** 2).mean()
    assert acc.norm4_mean == pytest.approx(float(norm4), rel=1e-12)
    assert acc.count == 300


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_merging_k_shards_equals_single_pass(shards):
    x = _data(210, 9, seed=shards, shift=1e3)  # large mean: the naive Σxxᵀ − nμμᵀ would lose digits
    single = SecondMomentAccumulator(9).update(x)
    parts = [SecondMomentAccumulator(9).update(c) for c in torch.tensor_split(x, shards)]
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    assert merged.count == single.count
    torch.testing.assert_close(merged.mean, single.mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(merged.m2, single.m2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        merged.covariance(), torch.cov(x.T, correction=0), rtol=1e-8, atol=1e-8
    )


def test_merge_rejects_other_dimension():
    with pytest.raises(ValueError, match="dim=4"):
        SecondMomentAccumulator(3).merge(SecondMomentAccumulator(4))


def test_ledoit_wolf_intensity_matches_per_sample_formula():
    x = _data(15, 10, seed=3, shift=0.0)
    n, p = x.shape
    S = x.T @ x / n
    mu = torch.trace(S) / p
    delta2 = ((S - mu * torch.eye(p)) ** 2).sum() / p
    beta_bar2 = sum(((torch.outer(r, r) - S) ** 2).sum() / p for r in x) / n**2
    expected = float(min(beta_bar2, delta2) / delta2)
    acc = SecondMomentAccumulator(p).update(x)
    got = ledoit_wolf_intensity(float(torch.trace(S)), float((S**2).sum()), acc.norm4_mean, n, p)
    assert got == pytest.approx(expected, rel=1e-10)
    assert 0 < got < 1


def _true_cov(d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    V = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    evals = torch.linspace(3.0, 0.5, d, dtype=torch.float64)
    return (V * evals) @ V.T


@pytest.mark.parametrize("method", ["ledoit_wolf", "oas"])
def test_shrinkage_lowers_frobenius_error_with_few_samples(method):
    d, n = 40, 20
    true = _true_cov(d)
    L = torch.linalg.cholesky(true)
    errs = {"none": 0.0, method: 0.0}
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, generator=g, dtype=torch.float64) @ L.T
        acc = SecondMomentAccumulator(d).update(x)
        for m in errs:
            errs[m] += float(torch.linalg.norm(acc.estimate(m).dense() - true))
    assert errs[method] < 0.6 * errs["none"], errs


def test_shrinkage_vanishes_with_many_samples():
    true = _true_cov(8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 8, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(true).T
    S = x.T @ x / x.shape[0]
    tr, fro = float(torch.trace(S)), float((S**2).sum())
    norm4 = float((x.pow(2).sum(1) ** 2).mean())
    assert ledoit_wolf_intensity(tr, fro, norm4, x.shape[0], 8) < 0.01
    assert oas_intensity(tr, fro, x.shape[0], 8) < 0.01


def test_unknown_shrinkage_is_rejected():
    acc = SecondMomentAccumulator(3).update(torch.randn(5, 3))
    with pytest.raises(ValueError, match="ledoit_wolf"):
        acc.estimate("lw")


def _spiked(n: int, d: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q
    x = torch.randn(n, k, generator=g, dtype=torch.float64) * 5.0 @ U.T
    return x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64), U


def test_nystrom_sketch_recovers_planted_subspace_and_trace():
    x, U = _spiked(2000, 64, 4, seed=0)
    sk = NystromSketch(64, 16, seed=1)
    for c in torch.split(x, 300):
        sk.update(c)
    est = sk.estimate()
    dense = x.T @ x / x.shape[0]
    assert est.trace() == pytest.approx(float(torch.trace(dense)), rel=1e-10)
    top = est.evecs[:, :4]
    overlap = float(torch.linalg.norm(U.T @ top) ** 2 / 4)
    assert overlap > 0.999
    true_top = torch.linalg.eigvalsh(dense).flip(0)[:4]
    # Nyström is a lower bound (C ⪰ Ĉ): top eigenvalues within a few % with a noisy tail
    torch.testing.assert_close(est.evals[:4], true_top, rtol=0.03, atol=0)
    assert bool((est.evals[:4] <= true_top * (1 + 1e-9)).all())
    # C^{1/2} C^{-1/2} = I on the representation (needed by the whitened init)
    M = torch.randn(3, 64, dtype=torch.float64)
    damped = est.damped(0.01)
    torch.testing.assert_close(damped.apply_power(damped.apply_power(M, 0.5), -0.5), M)


def test_sketch_shard_merge_equals_single_pass():
    x, _ = _spiked(500, 40, 3, seed=2)
    single = NystromSketch(40, 8, seed=5).update(x)
    merged = NystromSketch(40, 8, seed=5)
    for c in torch.tensor_split(x, 4):
        merged.merge(NystromSketch(40, 8, seed=5).update(c))
    torch.testing.assert_close(merged.y_sum, single.y_sum, rtol=1e-12, atol=1e-10)
    assert merged.count == single.count
    with pytest.raises(ValueError, match="seed must match"):
        merged.merge(NystromSketch(40, 8, seed=6))


DDP_WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from adarank.init import SecondMomentAccumulator, NystromSketch, all_reduce_accumulators
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    x = torch.randn(90, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 2
    mine = torch.tensor_split(x, world)[rank]
    accs = {"dense": SecondMomentAccumulator(6).update(mine),
            "sketch": NystromSketch(6, 3, seed=1).update(mine)}
    assert all_reduce_accumulators(accs)
    torch.save({"m2": accs["dense"].m2, "mean": accs["dense"].mean, "n": accs["dense"].count,
                "y": accs["sketch"].y_sum, "n4": accs["dense"].norm4_mean}, out)
    dist.destroy_process_group()
    """
)


def test_ddp_all_reduce_equals_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", str(port), str(tmp_path / f"r{r}.pt")],
            env=env,
        )
        for r in range(2)
    ]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    x = torch.randn(90, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 2
    single = SecondMomentAccumulator(6).update(x)
    sketch = NystromSketch(6, 3, seed=1).update(x)
    for r in range(2):
        got = torch.load(tmp_path / f"r{r}.pt", weights_only=True)
        assert got["n"] == 90
        torch.testing.assert_close(got["mean"], single.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["m2"], single.m2, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got["y"], sketch.y_sum, rtol=1e-10, atol=1e-10)
        assert got["n4"] == pytest.approx(single.norm4_mean, rel=1e-12)
