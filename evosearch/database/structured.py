"""Structured sub-networks and their reformation, after "Search for Efficient Large
Language Models" (Shen et al., NeurIPS 2024, arXiv 2409.17372).

A structured level keeps whole attention heads and whole MLP channels. Which ones is
decided by Hessian-based importance scores summed over each group's weights
(``group_scores`` then ``keep_mask``). Removing a head deletes its rows of q/k/v_proj
and its input columns of o_proj; removing an MLP channel deletes a row of
gate/up_proj and an input column of down_proj. The deleted rows cannot be repaired
inside their own layer (their outputs are gone), but the consumer layer can: its kept
input columns are rectified so that its output still matches the dense layer on the
calibration inputs, using what the omitted columns used to contribute (``reform``).

Everything is in terms of one layer's ``W`` (out, in) and its input Hessian
``H = X^T X / n`` (see ``evosearch.database.hessian``), whose layer error is

    E(W_hat) = ||(W - W_hat) X^T||^2 / n = tr((W - W_hat) H (W - W_hat)^T).
"""

from __future__ import annotations

import torch

from evosearch.database.hessian import damped


def weight_saliency(W: torch.Tensor, H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """OBS saliency of every weight, W_ij^2 / [H^-1]_jj, shape (out, in), float32.

    This is the increase of E when w_ij alone is removed and the other weights of its
    row are optimally updated (Optimal Brain Surgeon, Hassibi & Stork 1993), the
    Hessian-based importance behind the paper's mask initialisation. SparseGPT's
    w^2 / [Hinv]_jj^2 is the same quantity: its Hinv is the Cholesky factor of H^-1,
    and [Hinv]_jj^2 = [H_F^-1]_jj over the columns F = j.. not yet swept. H is damped by ``damp`` * mean(diag H) so the inverse exists. Summed over
    a column the score is exact for the whole column: ||W_:j||^2 / [H^-1]_jj is the
    error of deleting input j from every row with the best compensation, which is
    what deleting one MLP channel from down_proj does.
    """
    L = torch.linalg.cholesky(damped(H.to(W.device), damp))
    Hinv_diag = torch.diagonal(torch.cholesky_inverse(L))
    return (W.double() ** 2 / Hinv_diag).float()


def group_scores(
    W: torch.Tensor, H: torch.Tensor, groups: torch.Tensor, axis: int, damp: float = 0.01
) -> torch.Tensor:
    """Importance of every group of rows (axis=0) or input columns (axis=1) of W.

    ``groups`` gives the group id (0 .. G-1) of every row or column, e.g.
    ``torch.arange(576) // 64`` for the heads of a 576-wide attention with head_dim 64
    (rows of q_proj, columns of o_proj), or ``torch.arange(1536)`` for the channels of
    an MLP (rows of gate/up_proj, columns of down_proj). Returns the (G,) sums of
    ``weight_saliency`` over each group's weights. The scores of a head or channel in
    different layers are in the same unit (output error) and add up: a head's score
    is the sum of its q, k, v and o_proj scores, each with that layer's own H.
    """
    per_line = weight_saliency(W, H, damp).sum(dim=1 - axis)
    groups = groups.to(per_line.device)
    return torch.zeros(int(groups.max()) + 1, device=per_line.device).index_add_(0, groups, per_line)


def keep_mask(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Boolean (G,) mask keeping the round(keep_ratio * G) groups with the highest scores.

    Expand to rows or columns with ``keep_mask(scores, r)[groups]``.
    """
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.index_fill_(0, scores.topk(round(keep_ratio * scores.numel())).indices, True)


def _support(W: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    keep = keep.to(device=W.device, dtype=torch.bool)
    if keep.shape == W.shape:
        return keep
    if keep.shape == W.shape[1:]:
        return keep.expand_as(W)
    raise ValueError(f"keep must have shape {tuple(W.shape[1:])} (columns) or {tuple(W.shape)}, got {tuple(keep.shape)}")


def reform_closed_form(W: torch.Tensor, H: torch.Tensor, keep_columns: torch.Tensor, damp: float = 0.0) -> torch.Tensor:
    """Exact least-squares rectification when whole input columns S are kept:

        W_hat[:, S] = W H[:, S] H[S, S]^-1,   W_hat[:, not S] = 0,

    the minimiser of E over weights that use only the inputs in S (the kept columns
    absorb the part of the omitted inputs they can predict). ``damp`` adds
    damp * mean(diag H) to H's diagonal (a ridge pull towards W) as in ``reform``;
    with damp=0 H[S, S] must be invertible. Float64 throughout.
    """
    S = _support(W, keep_columns)[0]
    Hd = damped(H.to(W.device), damp)
    W_S = torch.cholesky_solve(Hd[S] @ W.double().T, torch.linalg.cholesky(Hd[S][:, S])).T
    W_hat = torch.zeros_like(W, dtype=torch.float64)
    W_hat[:, S] = W_S
    return W_hat.to(W.dtype)


def reform(
    W: torch.Tensor,
    H: torch.Tensor,
    keep: torch.Tensor,
    rho: float = 0.3,
    iterations: int = 30,
    damp: float = 0.0,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Rectify the kept weights of W so that the layer output matches the dense one.

    Solves  min_{W_hat} tr((W - W_hat) H (W - W_hat)^T)  s.t.  W_hat = 0 off ``keep``
    by ADMM, as the paper's reformation does. ``keep`` is a (in,) column mask (heads
    or channels removed from o_proj / down_proj) or a full (out, in) mask (e.g. the
    support of an unstructured pruning result, to compare with SparseGPT's update).
    With the scaled dual U, penalty rho and P the projection onto the mask:

        W_k = (W H + rho (Z - U)) (H + rho I)^-1     least squares, pulled to Z - U
        Z   = P(W_k + U)                             back onto the mask
        U   = U + W_k - Z                            dual ascent on W_k = Z

    H is first scaled to unit diagonal (W's columns scaled to match; the objective and
    the mask are unchanged), so that rho is relative to the inputs' energy and one
    default serves every layer; (H + rho I) is factored once. The iterates converge
    to the constrained least-squares optimum (``reform_closed_form`` in the column
    case, which gives it directly and cheaper). On SmolLM2's block 0 with half the
    down_proj channels removed, rho=0.3 is within 0.1 % of the optimum after about 20
    iterations (0.1 and 1 are slower); o_proj, whose inputs are far worse
    conditioned, is still 5 to 15 % above it after 40 iterations (rho 0.03 to 1).

    ADMM is not a descent method: it decreases a joint primal-dual distance to the
    solution, not E of its feasible iterate Z, and for small rho E(Z) often rises for
    a few iterations (a test shows such a case). So the iterate returned is not Z.

    Monotone reporting, for an honest reason: the returned iterate Y does an exact
    line search, per output row (E is a sum of independent row quadratics), along
    the step from Y to the new ADMM point Z:

        Y <- Y + t (Z - Y),   t = argmin_t E(Y + t (Z - Y)),

    closed form t = <R, D> / <D H, D> per row, with D = Z - Y and R = (W - Y) H.
    Then E(Y_new) <= E(Y) (t = 0 is a candidate) and E(Y_new) <= E(Z) (t = 1 is),
    so the history never increases and converges at least as fast as ADMM's own
    feasible iterate. Y feeds nothing back into ADMM, whose iterates stay the paper's.
    Y starts at ``start`` masked (default W masked, i.e. no rectification) and only
    ever moves along differences of masked points, so pruned entries stay exactly 0.

    ``damp`` adds damp * mean(diag H) to H's diagonal (a ridge pull towards W) and is
    not needed for the solves, since rho I already makes H + rho I invertible.

    Returns (W_hat, history): W_hat in W's dtype, exactly 0 off ``keep``; history has
    iterations + 1 values of the objective tr((W - Y) H (W - Y)^T) (H damped when
    damp > 0), i.e. the mean squared output error per calibration row, not
    multiplied by n, from the start point to the returned iterate.
    """
    P = _support(W, keep).float()
    Hd = damped(H.to(W.device), damp)
    d = torch.diagonal(Hd).sqrt()
    Hn = Hd / torch.outer(d, d)  # unit diagonal
    eye = torch.eye(Hn.shape[0], dtype=torch.float64, device=W.device)
    A = torch.cholesky_inverse(torch.linalg.cholesky(Hn + rho * eye)).float()
    Hn, d = Hn.float(), d.float()
    Wn = W.float() * d
    WHA = Wn @ Hn @ A  # constant part of every W-update

    Z = P * (Wn if start is None else start.float() * d)
    U = torch.zeros_like(Z)
    Y = Z.clone()
    R = (Wn - Y) @ Hn  # minus half the gradient of E at Y, kept up to date below
    E_rows = ((R * (Wn - Y)).sum(dim=1, dtype=torch.float64))
    history = [float(E_rows.sum())]
    for _ in range(iterations):
        W_k = WHA + rho * (Z - U) @ A
        Z = P * (W_k + U)
        U = U + W_k - Z

        D = Z - Y
        DH = D @ Hn
        num = (R * D).sum(dim=1, dtype=torch.float64)
        den = (DH * D).sum(dim=1, dtype=torch.float64)
        t = torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
        Y += t.float()[:, None] * D
        R -= t.float()[:, None] * DH
        E_rows -= t * num  # = E(Y) - <R,D>^2 / <DH,D>, the quadratic's exact decrease
        history.append(float(E_rows.sum()))
    return (Y / d).to(W.dtype), history
