"""Test data for the layer-wise algorithms: inputs shaped like real activations.

A plain module the tests import (fixture included), not a conftest.py, so that it
does not mix with the fixtures of other parts of the test suite."""

import pytest
import torch

from evosearch.database.hessian import Hessian


def correlated_inputs(rows: int, columns: int, seed: int = 0, outliers: int = 4) -> torch.Tensor:
    """Rows of X with strongly correlated columns and a few outlier channels.

    Real transformer activations are low-rank-ish (columns mix a few shared factors)
    and a handful of hidden channels carry values an order of magnitude larger; both
    matter, because they are what second-order methods exploit over magnitude.
    """
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(rows, columns // 4, generator=g)
    mixing = torch.randn(columns // 4, columns, generator=g)
    X = factors @ mixing / (columns // 4) ** 0.5 + 0.3 * torch.randn(rows, columns, generator=g)
    X[:, :outliers] *= 20
    return X


def hessian_of(X: torch.Tensor, batch: int = 500) -> Hessian:
    h = Hessian(X.shape[1])
    for x in X.split(batch):
        h.add_batch(x)
    return h


@pytest.fixture(scope="module")
def layer():
    """A (96, 256) weight and the Hessian of 2048 correlated input rows."""
    X = correlated_inputs(2048, 256)
    W = 0.05 * torch.randn(96, 256, generator=torch.Generator().manual_seed(1))
    return W, hessian_of(X), X
