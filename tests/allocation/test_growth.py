import torch

from adarank.allocation import growth_candidates, randomized_svd
from adarank.modules import SVDLoRALinear


def test_randomized_svd_matches_full_svd():
    torch.manual_seed(0)
    a = (
        torch.randn(200, 80, dtype=torch.float64)
        @ torch.diag(torch.logspace(0, -3, 80, dtype=torch.float64))
        @ torch.linalg.qr(torch.randn(80, 80, dtype=torch.float64)).Q
    )
    u, s, v = randomized_svd(a, 5, seed=3)
    s_ref = torch.linalg.svdvals(a)[:5]
    assert torch.allclose(s, s_ref, rtol=1e-3)  # flat spectrum: two power iterations
    gap = (
        torch.linalg.qr(torch.randn(200, 5, dtype=torch.float64)).Q
        @ torch.diag(torch.tensor([9.0, 7, 5, 3, 2], dtype=torch.float64))
        @ torch.linalg.qr(torch.randn(80, 5, dtype=torch.float64)).Q.T
        + 1e-3 * a
    )
    _, s_gap, _ = randomized_svd(gap, 5, seed=0)
    assert torch.allclose(s_gap, torch.linalg.svdvals(gap)[:5], rtol=1e-8)
    u2, s2, v2 = randomized_svd(a, 5, seed=3)
    assert torch.equal(u, u2) and torch.equal(s, s2)  # seeded: bit-identical


def test_candidates_orthogonal_to_live_and_top_of_projected_gradient():
    torch.manual_seed(0)
    d_out, d_in, r, k = 40, 30, 5, 4
    P = torch.randn(d_out, r)
    Q = torch.randn(r, d_in)
    G = torch.randn(d_out, d_in, dtype=torch.float64)
    C = torch.eye(d_in, dtype=torch.float64) * 2.0
    cand = growth_candidates(G, P, Q, k, input_moment=C)
    assert cand.k == k
    assert (P.double().T @ cand.p_cols).abs().max() < 1e-8
    assert (Q.double() @ cand.q_rows.T).abs().max() < 1e-8
    # reference: full SVD of the explicitly projected gradient
    up = torch.linalg.qr(P.double()).Q
    vq = torch.linalg.qr(Q.double().T).Q
    proj = (
        (torch.eye(d_out, dtype=torch.float64) - up @ up.T)
        @ G
        @ (torch.eye(d_in, dtype=torch.float64) - vq @ vq.T)
    )
    s_ref = torch.linalg.svdvals(proj)[:k]
    assert torch.allclose(cand.sigma, s_ref, rtol=2e-2)  # randomized SVD of a flat spectrum
    # sigma = u^T G v (the lambda-gradient of the new triplet up to scaling)
    direct = torch.einsum("ik,ij,kj->k", cand.p_cols, G, cand.q_rows)
    assert torch.allclose(direct.abs(), cand.sigma, rtol=1e-6)
    assert torch.allclose(cand.energy_in, torch.full((k,), 2.0, dtype=torch.float64))
    diag = growth_candidates(G, P, Q, k, input_moment=torch.full((d_in,), 2.0, dtype=torch.float64))
    assert torch.allclose(diag.energy_in, cand.energy_in)


def test_growth_leaves_output_unchanged_and_can_exceed_initial_rank():
    torch.manual_seed(0)
    layer = SVDLoRALinear(torch.nn.Linear(24, 16), rank=2)
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.tensor([0.5, -1.0]))
    x = torch.randn(8, 24)
    y0 = layer(x)
    cand = growth_candidates(torch.randn(16, 24), layer.lora_P, layer.lora_Q, 6)
    layer.grow(cand.p_cols.float(), cand.q_rows.float())
    assert layer.rank == 8
    assert torch.allclose(layer(x), y0, atol=1e-6, rtol=0)  # λ = 0: only round-off differs


def test_input_energy_from_samples_matches_moment():
    torch.manual_seed(0)
    x = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    v = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64)).Q.T
    from adarank.allocation import input_energy

    by_samples = input_energy(v, input_samples=x)
    by_moment = input_energy(v, input_moment=x.T @ x / len(x))
    assert torch.allclose(by_samples, by_moment)
    assert torch.allclose(by_samples, ((x @ v.T) ** 2).mean(0))
