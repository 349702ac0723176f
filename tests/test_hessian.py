import logging

import torch

from evosearch.database.hessian import Hessian, damped_inverse_cholesky, layer_error
from layer_data import correlated_inputs, hessian_of


def test_hessian_is_the_mean_outer_product_whatever_the_batches():
    X = correlated_inputs(1000, 64)
    one, many = hessian_of(X, batch=1000), hessian_of(X, batch=37)
    expected = (X.double().T @ X.double() / 1000).float()
    assert one.nsamples == many.nsamples == 1000
    torch.testing.assert_close(one.H, expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(many.H, expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(many.column_norms(), X.norm(dim=0), rtol=1e-4, atol=1e-4)


def test_add_batch_accepts_sequence_dimensions():
    X = correlated_inputs(96, 16)
    h = Hessian(16)
    h.add_batch(X.reshape(4, 24, 16))
    assert h.nsamples == 96
    torch.testing.assert_close(h.H, X.T @ X / 96, rtol=1e-5, atol=1e-5)


def test_layer_error_is_the_mean_squared_output_error():
    X = correlated_inputs(500, 32)
    W, W_hat = torch.randn(8, 32), torch.randn(8, 32)
    direct = ((W - W_hat) @ X.T).pow(2).sum().item() / 500
    assert abs(layer_error(W, W_hat, hessian_of(X).H) - direct) < 1e-4 * direct


def test_damped_inverse_cholesky_factors_the_damped_inverse():
    H = hessian_of(correlated_inputs(500, 32)).H.double()
    U = damped_inverse_cholesky(H, damp=0.01).double()
    damped = H + 0.01 * H.diagonal().mean() * torch.eye(32, dtype=torch.float64)
    assert torch.equal(U, U.triu())
    torch.testing.assert_close(U.T @ U @ damped, torch.eye(32, dtype=torch.float64), atol=1e-4, rtol=0)


def test_dead_and_rank_deficient_inputs_still_factor(caplog):
    X = correlated_inputs(20, 32)  # fewer rows than columns: H is singular
    X[:, 5] = 0  # an input that never fires
    H = hessian_of(X).H
    with caplog.at_level(logging.WARNING, logger="evosearch"):
        U = damped_inverse_cholesky(H, damp=0.0)
    assert torch.isfinite(U).all() and (U.diagonal() > 0).all()
    assert "not positive definite" in caplog.text
