"""Unstructured and N:M pruning of one linear layer: magnitude, Wanda and SparseGPT.

Conventions shared by every function here:

* ``W`` has the ``nn.Linear`` layout (out_features, in_features) and is never modified;
  the result is a new tensor with W's dtype and device.
* ``sparsity`` is the fraction of weights set to zero in the layer. Unstructured
  pruning zeroes exactly ``round(sparsity * W.numel())`` weights, spread over the
  comparison groups (rows for Wanda, column blocks for SparseGPT) so that each group
  is within one weight of its share. ``sparsity=0`` returns W unchanged.
* ``nm=(n, m)`` asks for n zeros in every m consecutive input weights of a row:
  (2, 4) is the 2:4 pattern of sparse tensor cores, (1, 4) is 25 % sparse, (4, 8)
  50 %. The N:M level fixes the sparsity, so ``sparsity`` must then equal n / m; a
  mismatch is an error rather than being silently ignored.
"""

from __future__ import annotations

import torch

from evosearch.database.hessian import damped_inverse_cholesky


def _check_level(W: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> None:
    if nm is None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        return
    n, m = nm
    if not 0 < n < m:
        raise ValueError(f"nm=(n, m) needs 0 < n < m, got {nm}")
    if W.shape[1] % m:
        raise ValueError(f"in_features={W.shape[1]} is not a multiple of m={m}")
    if abs(sparsity - n / m) > 1e-9:
        raise ValueError(f"nm={nm} means sparsity {n / m}, got sparsity={sparsity}")


def _split_counts(sparsity: float, groups: int, group_size: int) -> torch.Tensor:
    """Zeros per group: each within one of sparsity * group_size, the total exactly
    round(sparsity * groups * group_size) (cumulative rounding)."""
    edges = torch.round(sparsity * group_size * torch.arange(groups + 1, dtype=torch.float64))
    return (edges[1:] - edges[:-1]).long()


def _lowest(scores: torch.Tensor, counts: torch.Tensor | int) -> torch.Tensor:
    """Boolean mask of the ``counts[r]`` lowest scores of every row r (True = prune)."""
    counts = torch.as_tensor(counts, device=scores.device).reshape(-1, 1)
    order = scores.argsort(dim=1)
    ranked = torch.arange(scores.shape[1], device=scores.device) < counts
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, ranked.expand_as(scores))


def _nm_mask(scores: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    n, m = nm
    return _lowest(scores.reshape(-1, m), n).reshape(scores.shape)


def nm_mask_ok(W: torch.Tensor, nm: tuple[int, int]) -> bool:
    """True when every group of m consecutive input weights of every row has >= n zeros."""
    n, m = nm
    if W.shape[-1] % m:
        return False
    return bool(((W.reshape(-1, m) == 0).sum(dim=1) >= n).all())


def magnitude_prune(W: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Zero the smallest |W|: over the whole layer, or within each N:M group."""
    _check_level(W, sparsity, nm)
    scores = W.abs().float()
    if nm is not None:
        mask = _nm_mask(scores, nm)
    else:
        mask = _lowest(scores.reshape(1, -1), round(sparsity * W.numel())).reshape(W.shape)
    return W.masked_fill(mask, 0)


def wanda_prune(
    W: torch.Tensor, column_norms: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Wanda (Sun et al., 2023): zero the smallest |W_ij| * ||X_j|| within each output row.

    The comparison group is the output row, as in the paper: every row loses (within
    one weight) the same number of inputs. ``column_norms`` is ``Hessian.column_norms()``.
    """
    _check_level(W, sparsity, nm)
    scores = W.abs().float() * column_norms.to(W.device, torch.float32)
    if nm is not None:
        mask = _nm_mask(scores, nm)
    else:
        mask = _lowest(scores, _split_counts(sparsity, W.shape[0], W.shape[1]).to(W.device))
    return W.masked_fill(mask, 0)


class SparseGPT:
    """SparseGPT (Frantar & Alistarh, 2023) for one layer, set up once for many levels.

    The constructor does the per-layer work that every level shares: a float32 copy of
    W (its dead input columns zeroed) and Hinv, the upper Cholesky factor of the damped
    inverse Hessian. ``prune`` then
    runs the blocked OBS sweep over input columns: inside a block of ``block_size``
    columns the mask is chosen adaptively from the current (already updated) weights
    by the OBS saliency w^2 / [Hinv]_jj^2, each column is pruned in turn and its error
    is spread over the block's later columns; the accumulated error updates all later
    columns once per block with one matrix product (the lazy batch update).

    ``prune_levels`` sweeps several unstructured levels at once, stacked on a leading
    axis: the column loop (which is Python) runs once for all of them, so a database of
    many levels costs little more than one level.
    """

    def __init__(self, W: torch.Tensor, H: torch.Tensor, damp: float = 0.01, block_size: int = 128):
        self.dtype = W.dtype
        self.W = W.detach().to(torch.float32).clone()
        # Inputs that never fired (H_jj = 0) carry nothing: their weights are zeroed first, as every
        # reference does, so they count among a level's zeros instead of live weights being pruned.
        self.W[:, torch.diagonal(H).to(W.device) == 0] = 0
        self.Hinv = damped_inverse_cholesky(H.to(W.device), damp)
        self.block_size = block_size

    def prune(self, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
        _check_level(self.W, sparsity, nm)
        if nm is None:
            return self.prune_levels([sparsity])[0]
        m = nm[1]
        return self._sweep(1, m * max(1, self.block_size // m), nm=nm)[0]  # no N:M group straddles two blocks

    def prune_levels(self, sparsities: list[float]) -> list[torch.Tensor]:
        """Unstructured pruning at every sparsity in ``sparsities``, in one sweep."""
        if not sparsities:  # a space of N:M levels only (sparsity-2of4) asks for none
            return []
        for sparsity in sparsities:
            _check_level(self.W, sparsity, None)
        rows, cols = self.W.shape
        bs = self.block_size
        # Zeros per level and block, so that each level's layer total is exact.
        edges = torch.tensor([[round(s * rows * min(c, cols)) for c in range(0, cols + bs, bs)] for s in sparsities],
                             device=self.W.device)

        def block_mask(W1, d, b):
            saliency = (W1**2 / d**2).reshape(len(sparsities), -1)
            return _lowest(saliency, edges[:, b + 1] - edges[:, b]).reshape(W1.shape)

        pruned = self._sweep(len(sparsities), bs, block_mask=block_mask)
        return [self.W.to(self.dtype).clone() if s == 0 else p for s, p in zip(sparsities, pruned)]

    def _sweep(self, levels: int, bs: int, block_mask=None, nm: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """The OBS sweep on ``levels`` copies of W; the mask of each block comes from
        ``block_mask(W1, d, b)`` up front, or for N:M group by group as the sweep reaches it."""
        Hinv = self.Hinv
        W = self.W.expand(levels, *self.W.shape).clone()
        cols = W.shape[2]
        for b, i1 in enumerate(range(0, cols, bs)):
            i2 = min(i1 + bs, cols)
            W1 = W[:, :, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diagonal(Hinv1)
            mask1 = block_mask(W1, d, b) if block_mask else torch.zeros_like(W1, dtype=torch.bool)
            for i in range(i2 - i1):
                if nm is not None and i % nm[1] == 0:
                    group = slice(i, i + nm[1])
                    mask1[:, :, group] = _nm_mask(W1[:, :, group] ** 2 / d[group] ** 2, nm)
                w = W1[:, :, i]
                q = w.masked_fill(mask1[:, :, i], 0)
                err = (w - q) / d[i]
                W1[:, :, i] = q
                W1[:, :, i + 1 :] -= err[:, :, None] * Hinv1[i, i + 1 :]
                Err1[:, :, i] = err
            W[:, :, i1:i2] = W1
            W[:, :, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        return [w.to(self.dtype) for w in W]
