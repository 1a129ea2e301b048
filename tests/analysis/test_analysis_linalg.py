"""Maths of the analysis against dense references and hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from adarank.analysis.linalg import (
    delta_svd,
    delta_vs_weight,
    effective_rank,
    energy_rank,
    random_orthonormal,
    random_subspace_baseline,
    subspace_similarity,
    subspace_similarity_grid,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _factors(rng, d_out=12, d_in=20, r=5):
    P = rng.standard_normal((d_out, r))
    lam = rng.standard_normal(r)
    Q = rng.standard_normal((r, d_in))
    return P, lam, Q


# ------------------------------------------------------------------ SVD of ΔW from factors
def test_delta_svd_matches_dense_svd(rng):
    P, lam, Q = _factors(rng)
    dense = 0.7 * P @ np.diag(lam) @ Q
    svd = delta_svd(P, lam, Q, scaling=0.7)
    s_ref = np.linalg.svd(dense, compute_uv=False)
    assert svd.rank == 5
    np.testing.assert_allclose(svd.S, s_ref[:5], rtol=1e-10)
    np.testing.assert_allclose(svd.U @ np.diag(svd.S) @ svd.Vh, dense, atol=1e-10)
    np.testing.assert_allclose(svd.U.T @ svd.U, np.eye(5), atol=1e-10)
    np.testing.assert_allclose(svd.Vh @ svd.Vh.T, np.eye(5), atol=1e-10)
    assert svd.frobenius == pytest.approx(np.linalg.norm(dense))


def test_delta_svd_drops_zero_lambda_and_handles_rank_zero(rng):
    P, lam, Q = _factors(rng)
    lam[[1, 3]] = 0.0  # pruned-by-zero / freshly grown triplets
    svd = delta_svd(P, lam, Q)
    assert svd.rank == 3
    np.testing.assert_allclose(svd.S, np.linalg.svd(P @ np.diag(lam) @ Q, compute_uv=False)[:3])
    empty = delta_svd(np.zeros((4, 0)), np.zeros(0), np.zeros((0, 6)))
    assert empty.rank == 0 and empty.U.shape == (4, 0) and empty.Vh.shape == (0, 6)
    with pytest.raises(ValueError, match="rank mismatch"):
        delta_svd(P, lam[:4], Q)


def test_effective_rank_against_dense_spectrum(rng):
    P, lam, Q = _factors(rng, r=6)
    dense = P @ np.diag(lam) @ Q
    s = np.linalg.svd(dense, compute_uv=False)
    s = s[s > 1e-9 * s[0]]
    p = s / s.sum()
    ref = np.exp(-(p * np.log(p)).sum())  # Roy & Vetterli 2007, Eq. (2)
    assert effective_rank(delta_svd(P, lam, Q).S) == pytest.approx(ref, rel=1e-9)
    energy = np.cumsum(s**2) / np.sum(s**2)
    assert energy_rank(delta_svd(P, lam, Q).S, 0.9) == int(np.argmax(energy >= 0.9)) + 1


def test_effective_rank_limits():
    assert effective_rank(np.full(4, 3.0)) == pytest.approx(4.0)
    assert effective_rank(np.array([5.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(np.zeros(3)) == 0.0
    assert energy_rank(np.array([3.0, 4.0]), 0.9) == 2  # 16/25 = 0.64 < 0.9
    assert energy_rank(np.array([1.0, 10.0]), 0.9) == 1  # 100/101 ≥ 0.9
    with pytest.raises(ValueError, match="fraction"):
        energy_rank(np.ones(2), 1.5)


# ------------------------------------------------------------------ subspace similarity φ
def test_phi_is_one_for_identical_subspaces(rng):
    U = random_orthonormal(64, 8, rng)
    np.testing.assert_allclose(subspace_similarity_grid(U, U), np.ones((8, 8)), atol=1e-12)
    # the same 8-dim subspace in another basis: φ at full ranks is still 1
    R = random_orthonormal(8, 8, rng)
    assert subspace_similarity(U, U @ R) == pytest.approx(1.0)


def test_phi_grid_matches_direct_formula(rng):
    U1, U2 = random_orthonormal(30, 4, rng), random_orthonormal(30, 6, rng)
    grid = subspace_similarity_grid(U1, U2)
    for i in range(1, 5):
        for j in range(1, 7):
            direct = np.linalg.norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j)
            assert grid[i - 1, j - 1] == pytest.approx(direct)
            assert subspace_similarity(U1, U2, i, j) == pytest.approx(direct)


@pytest.mark.parametrize("i,j", [(1, 1), (2, 8), (8, 4)])
def test_phi_of_random_subspaces_is_max_ij_over_d(rng, i, j):
    d, trials = 128, 400
    phis = np.array(
        [
            subspace_similarity(random_orthonormal(d, i, rng), random_orthonormal(d, j, rng))
            for _ in range(trials)
        ]
    )
    expected = random_subspace_baseline(i, j, d)
    assert expected == max(i, j) / d
    stderr = phis.std(ddof=1) / np.sqrt(trials)
    assert abs(phis.mean() - expected) < 5 * stderr, (phis.mean(), expected, stderr)
    # and clearly different from the min(i, j)/d one might guess
    assert abs(phis.mean() - min(i, j) / d) > 5 * stderr or i == j


def test_phi_rejects_mismatched_dimensions(rng):
    with pytest.raises(ValueError, match="same d"):
        subspace_similarity_grid(random_orthonormal(10, 2, rng), random_orthonormal(12, 2, rng))


# ------------------------------------------------------------------ ΔW vs W
def test_amplification_on_a_hand_computed_example(rng):
    # ΔW = 3 e1 e2ᵀ + 4 e3 e4ᵀ  (‖ΔW‖_F = 5), written with non-orthonormal factors
    P = np.zeros((4, 2))
    P[0, 0], P[2, 1] = 1.5, 2.0
    lam = np.array([2.0, 2.0])
    Q = np.zeros((2, 4))
    Q[0, 1], Q[1, 3] = 1.0, 1.0
    # W = 10·I + 2 E_12 + 1 E_34: U = [e3, e1], V = [e4, e2] so UᵀWV = [[W34, W32], [W14, W12]]
    W = 10 * np.eye(4)
    W[0, 1], W[2, 3] = 2.0, 1.0
    out = delta_vs_weight(W, delta_svd(P, lam, Q), rng)
    assert out["rank"] == 2
    assert out["delta_norm"] == pytest.approx(5.0)
    assert out["proj_delta_dirs"] == pytest.approx(np.sqrt(5.0))  # √(1² + 0 + 0 + 2²)
    assert out["amplification"] == pytest.approx(5.0 / np.sqrt(5.0))
    s_w = np.linalg.svd(W, compute_uv=False)
    assert out["proj_w_dirs"] == pytest.approx(np.sqrt(s_w[0] ** 2 + s_w[1] ** 2))
    assert out["w_norm"] == pytest.approx(np.linalg.norm(W))


def test_amplification_rank_one_in_a_weak_direction(rng):
    W = np.diag([10.0, 1.0, 0.1])
    P = np.array([[0.0], [0.0], [2.0]])
    Q = np.array([[0.0, 0.0, 1.0]])
    out = delta_vs_weight(W, delta_svd(P, np.array([2.5]), Q), rng)
    assert out["proj_delta_dirs"] == pytest.approx(0.1)
    assert out["amplification"] == pytest.approx(50.0)  # 5 / 0.1
    assert out["proj_w_dirs"] == pytest.approx(10.0)


def test_random_directions_projection_matches_its_expectation():
    rng = np.random.default_rng(1)
    d_out, d_in, r = 40, 60, 3
    W = rng.standard_normal((d_out, d_in))
    svd = delta_svd(rng.standard_normal((d_out, r)), np.ones(r), rng.standard_normal((r, d_in)))
    sq = [delta_vs_weight(W, svd, rng)["proj_random_dirs"] ** 2 for _ in range(300)]
    out = delta_vs_weight(W, svd, rng)
    expected_sq = out["random_expected"] ** 2  # r² ‖W‖² / (d_out d_in)
    stderr = np.std(sq, ddof=1) / np.sqrt(len(sq))
    assert abs(np.mean(sq) - expected_sq) < 5 * stderr, (np.mean(sq), expected_sq, stderr)


def test_delta_vs_weight_zero_update_and_shape_check(rng):
    empty = delta_svd(np.zeros((3, 0)), np.zeros(0), np.zeros((0, 5)))
    out = delta_vs_weight(np.ones((3, 5)), empty, rng)
    assert out["amplification"] is None and out["rank"] == 0
    with pytest.raises(ValueError, match="shape"):
        delta_vs_weight(np.ones((5, 3)), empty, rng)


@pytest.mark.parametrize("shape", [(7, 19), (19, 7)])
def test_top_singular_norm_matches_svd(rng, shape):
    from adarank.analysis.linalg import top_singular_norm

    W = rng.standard_normal(shape)
    s = np.linalg.svd(W, compute_uv=False)
    for r in (1, 3, 7):
        assert top_singular_norm(W, r) == pytest.approx(np.sqrt(np.sum(s[:r] ** 2)), rel=1e-10)
