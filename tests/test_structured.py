import pytest
import torch

from evosearch.database.hessian import layer_error
from evosearch.database.sparsity import SparseGPT, magnitude_prune
from evosearch.database.structured import group_scores, keep_mask, reform, reform_closed_form, weight_saliency
from layer_data import correlated_inputs, hessian_of, layer  # noqa: F401 (fixture)

HEADS = torch.arange(256) // 32  # 8 "heads" of 32 columns


def plain_admm_objectives(W, H, P, rho, iterations):
    """E(Z_k) of the paper's ADMM without the line search, in the same scaling."""
    d = H.diagonal().sqrt()
    Hn, Wn = H / torch.outer(d, d), W * d
    A = torch.linalg.inv(Hn + rho * torch.eye(len(d), dtype=H.dtype))
    Z, U, out = P * Wn, torch.zeros_like(W), []
    for _ in range(iterations):
        W_k = (Wn @ Hn + rho * (Z - U)) @ A
        Z = P * (W_k + U)
        U = U + W_k - Z
        out.append(float((((Wn - Z) @ Hn) * (Wn - Z)).sum()))
    return out


def test_column_score_is_the_exact_cost_of_deleting_that_input(layer):
    W, h, _ = layer
    scores = group_scores(W, h.H, torch.arange(256), axis=1, damp=0.0)
    for j in (0, 7, 100, 255):
        keep = torch.ones(256, dtype=torch.bool)
        keep[j] = False
        cost = layer_error(W, reform_closed_form(W, h.H, keep), h.H)
        assert abs(scores[j].item() - cost) < 1e-3 * cost


def test_group_scores_sum_each_groups_saliency(layer):
    W, h, _ = layer
    saliency = weight_saliency(W, h.H)
    by_column = group_scores(W, h.H, HEADS, axis=1)
    by_row = group_scores(W, h.H, torch.arange(96) // 12, axis=0)
    assert by_column.shape == (8,) and by_row.shape == (8,)
    torch.testing.assert_close(by_column[2], saliency[:, 64:96].sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(by_row[3], saliency[36:48].sum(), rtol=1e-5, atol=0)


def test_keep_mask_keeps_the_highest_scoring_groups():
    scores = torch.tensor([5.0, 1.0, 4.0, 3.0, 2.0, 0.5, 6.0, 7.0, 0.1])
    assert keep_mask(scores, 1 / 3).tolist() == [True] + [False] * 5 + [True, True, False]
    assert keep_mask(scores, 0.5).sum() == 4
    assert keep_mask(scores, 1.0).all() and not keep_mask(scores, 0.0).any()


def test_scored_heads_cost_less_than_other_choices(layer):
    W, h, _ = layer
    scores = group_scores(W, h.H, HEADS, axis=1)
    best = layer_error(W, reform_closed_form(W, h.H, keep_mask(scores, 0.5)[HEADS]), h.H)
    worst = layer_error(W, reform_closed_form(W, h.H, keep_mask(-scores, 0.5)[HEADS]), h.H)
    assert best < worst


@pytest.mark.parametrize("full_mask", [False, True])
def test_reform_never_changes_the_mask_and_returns_w_dtype(layer, full_mask):
    W, h, _ = layer
    keep = magnitude_prune(W, 0.6) != 0 if full_mask else keep_mask(group_scores(W, h.H, HEADS, axis=1), 0.5)[HEADS]
    W16 = W.to(torch.bfloat16)
    copy = W16.clone()
    W_hat, _ = reform(W16, h.H, keep, iterations=5)
    full = keep.expand_as(W)
    assert W_hat.dtype == torch.bfloat16 and torch.equal(W16, copy)
    assert (W_hat[~full] == 0).all()
    assert (W_hat[full] != W16[full]).float().mean() > 0.9  # the kept weights were rectified


def test_plain_admm_is_not_monotone_but_reform_history_is():
    # A small, well-conditioned problem on which the paper's ADMM raises E(Z) at
    # iteration 3: the reported objective must still never increase, and it is
    # never above ADMM's own (it can take the ADMM point itself, t = 1).
    g = torch.Generator().manual_seed(4)
    L = torch.randn(8, 8, generator=g, dtype=torch.float64)
    X = (torch.randn(32, 8, generator=g, dtype=torch.float64) @ L) * torch.logspace(0, 1, 8, dtype=torch.float64)
    H = X.T @ X / 32
    W = torch.randn(1, 8, generator=g, dtype=torch.float64) / H.diagonal().sqrt()
    P = (torch.rand(1, 8, generator=g) > 0.5).double()
    admm = plain_admm_objectives(W, H, P, rho=0.01, iterations=30)
    assert any(b > a * (1 + 1e-6) for a, b in zip(admm, admm[1:]))

    _, history = reform(W, H, P.bool(), rho=0.01, iterations=30)
    assert all(b <= a for a, b in zip(history, history[1:]))
    assert all(ours <= theirs * (1 + 1e-5) for ours, theirs in zip(history[1:], admm))


@pytest.mark.parametrize("rho", [0.03, 0.3, 3.0])
def test_reform_history_is_monotone_and_is_the_objective(layer, rho):
    W, h, _ = layer
    keep = magnitude_prune(W, 0.7) != 0
    W_hat, history = reform(W, h.H, keep, rho=rho, iterations=15)
    assert len(history) == 16
    assert all(b <= a for a, b in zip(history, history[1:]))
    assert history[-1] < 0.5 * history[0]
    assert abs(history[0] - layer_error(W, W * keep, h.H)) < 1e-4 * history[0]
    assert abs(history[-1] - layer_error(W, W_hat, h.H)) < 1e-3 * history[-1]


def test_reform_converges_to_the_closed_form(layer):
    W, h, _ = layer
    keep = keep_mask(group_scores(W, h.H, HEADS, axis=1), 0.5)[HEADS]
    exact = reform_closed_form(W, h.H, keep)
    W_hat, history = reform(W, h.H, keep, rho=0.3, iterations=60)
    optimum = layer_error(W, exact, h.H)
    assert history[0] > 3 * optimum  # rectification matters here
    assert history[-1] < optimum * (1 + 1e-4)
    assert (W_hat - exact).norm() < 1e-2 * exact.norm()


def test_reform_with_a_full_mask_reaches_each_rows_least_squares_optimum():
    X = correlated_inputs(1024, 64, seed=5)
    h = hessian_of(X)
    W = torch.randn(6, 64, generator=torch.Generator().manual_seed(6))
    keep = torch.rand(6, 64, generator=torch.Generator().manual_seed(7)) > 0.5
    H = h.H.double()
    exact = torch.zeros(6, 64, dtype=torch.float64)
    for r in range(6):  # each row's own support S_r: w_S = H[S, S]^-1 H[S, :] w
        S = keep[r]
        exact[r, S] = torch.linalg.solve(H[S][:, S], H[S] @ W[r].double())
    W_hat, _ = reform(W, h.H, keep, rho=0.3, iterations=150)
    assert (W_hat.double() - exact).norm() < 1e-2 * exact.norm()


def test_reform_after_sparsegpt_only_improves_on_it(layer):
    # Reformation started from SparseGPT's own result, on its support: the monotone
    # history guarantees it never does worse, and the exact update does better.
    W, h, _ = layer
    W_sparse = SparseGPT(W, h.H).prune(0.6)
    W_hat, history = reform(W, h.H, W_sparse != 0, start=W_sparse, iterations=10)
    assert abs(history[0] - layer_error(W, W_sparse, h.H)) < 1e-4 * history[0]
    assert layer_error(W, W_hat, h.H) < 0.9 * layer_error(W, W_sparse, h.H)
    assert torch.equal(W_hat == 0, W_sparse == 0)
