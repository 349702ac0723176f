"""Calibration statistics of one linear layer: the Hessian of its layer-wise loss.

Every layer-wise method here minimises (or scores against) the output error of one
linear layer on calibration inputs X (one row per token),

    E(W_hat) = ||(W - W_hat) X^T||^2 / n = tr((W - W_hat) H (W - W_hat)^T),

with H = X^T X / n the mean outer product of the layer's inputs. ``Hessian`` collects
that H once per layer; SparseGPT, GPTQ, Wanda (through ``column_norms``) and the
structured scores and reformation all read the same accumulator. The reference code
(IST-DASLab) keeps 2/n X^T X; the factor 2 changes no result, so H here is the plain
mean, which makes ``layer_error`` the mean squared output error per token.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("evosearch")


class Hessian:
    """Running mean of x x^T over every input row seen by a linear layer.

    ``add_batch(x)`` takes the layer's inputs with shape (..., columns) (any batch and
    sequence dimensions). After any split of the same rows into batches, ``H`` is the
    same matrix (up to float rounding) and ``nsamples`` the number of rows.
    """

    def __init__(self, columns: int, device: torch.device | str | None = None):
        self.columns = columns
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.columns).to(device=self.H.device, dtype=torch.float32)
        rows = x.shape[0]
        if rows == 0:
            return
        total = self.nsamples + rows
        # Rescale the old mean before adding, so H stays O(1) whatever the row count.
        self.H.mul_(self.nsamples / total).addmm_(x.T, x, alpha=1.0 / total)
        self.nsamples = total

    def column_norms(self) -> torch.Tensor:
        """||X[:, j]||_2 over all rows seen, per input column (Wanda's activation norm)."""
        return (torch.diagonal(self.H).clamp(min=0) * self.nsamples).sqrt()


def layer_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T): mean squared output error per calibration row."""
    D = (W.to(torch.float64) - W_hat.to(torch.float64))
    return float(((D @ H.to(torch.float64)) * D).sum())


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H in float64 with dead inputs fixed and ``damp`` * mean(diag H) added to the diagonal.

    A column that never fired (H_jj = 0) gets H_jj = 1, as in the reference code, so the
    matrix stays invertible; its weights do not affect the output either way.
    """
    H = H.to(torch.float64).clone()
    diag = torch.diagonal(H)
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    return H


def damped_inverse_cholesky(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1, so that U^T U = H^-1.

    This is the ``Hinv`` of SparseGPT and GPTQ: row i of U, scaled by 1 / U_ii, is the
    OBS update that spreads the error of fixing column i over the columns after it, and
    U_ii^2 is the inverse-Hessian diagonal of the columns not yet fixed. Computed in
    float64 (the inverse squares the condition number) and returned in float32. When H
    is not positive definite at this damping (fewer calibration rows than columns), the
    damping is raised tenfold until it is, with a warning.
    """
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(damped(H, damp))
        if info == 0:
            break
        logger.warning("Hessian is not positive definite at damp=%g; retrying with %g", damp, damp * 10)
        damp = damp * 10 if damp > 0 else 1e-6
    else:
        raise ValueError("Hessian is not positive definite even after raising the damping")
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True).to(torch.float32)
