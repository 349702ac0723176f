"""Weight quantisation of one linear layer: round-to-nearest and GPTQ.

A format (``QuantFormat``) is a bit-width, a group size along the input dimension
(``None`` = one group per output row) and a grid type. A quantised weight
(``QuantizedWeight``) is what export packs: integer ``codes`` in [0, 2^bits - 1] with
W's shape, and per row and group a float32 ``scale`` and an integer ``zero``, with

    W_hat[r, c] = scale[r, g(c)] * (codes[r, c] - zero[r, g(c)]),   g(c) = c // group_size.

Groups are contiguous in the original column order, also under GPTQ's act_order; the
last group is shorter when group_size does not divide in_features.

Grids (as in the GPTQ reference quantiser):

* asymmetric: min-max over the group, with the range widened to include 0 so that 0
  is exactly representable and ``zero`` is an integer in [0, 2^bits - 1];
* symmetric: ``zero = 2^(bits-1)`` and ``scale = 2 * max|w| / (2^bits - 1)``, the full
  range of codes (-2^(bits-1) .. 2^(bits-1) - 1 around the zero), which is what GPTQ
  kernels with ``sym=True`` expect.

How a quantised weight is stored on disk, and its byte count, is ``evosearch.layouts``'s.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from evosearch.database.hessian import damped_inverse_cholesky


@dataclass(frozen=True)
class QuantFormat:
    """``bits`` in 2..8; ``group_size`` input columns per scale (None = per row)."""

    bits: int
    group_size: int | None = 128
    symmetric: bool = False

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive or None, got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def symmetric_zero(self) -> int:
        """The zero point the symmetric grid implies (the middle code), stored nowhere."""
        return (self.maxq + 1) // 2

    def groups(self, columns: int) -> int:
        """Groups per row."""
        return 1 if self.group_size is None else -(-columns // self.group_size)

    def group_index(self, columns: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Group of every input column, shape (columns,)."""
        c = torch.arange(columns, device=device)
        return c // self.group_size if self.group_size is not None else torch.zeros_like(c)


@dataclass(frozen=True, eq=False)  # tensors have no single truth value to compare by
class QuantizedWeight:
    """Integer codes (uint8, W's shape), float32 scales and uint8 zeros (out, groups)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    fmt: QuantFormat
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        g = self.fmt.group_index(self.codes.shape[1], self.codes.device)
        W = self.scales[:, g] * (self.codes.float() - self.zeros[:, g].float())
        return W.to(self.dtype)


def distinct_per_group(W: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Number of distinct values in each row's groups of ``group_size`` input columns,
    shape (rows, groups): at most 2^bits for any weight that ``fmt`` represents."""
    rows, cols = W.shape
    size = cols if group_size is None else group_size
    groups = -(-cols // size)
    # Pad the short last group with copies of its last value: no new distinct values.
    padded = torch.cat([W, W[:, -1:].expand(rows, groups * size - cols)], dim=1)
    ordered = padded.reshape(rows, groups, size).sort(dim=2).values
    return (ordered[:, :, 1:] != ordered[:, :, :-1]).sum(dim=2) + 1


def _fit_grid(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int | torch.Tensor,
              symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (float, integral) of the grid covering [xmin, xmax] (widened to 0);
    ``maxq``: the largest code, one number or a tensor broadcast against xmin (GPTQ's
    sweep stacks formats along the rows, each row with its own)."""
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = xmax == xmin  # an all-zero group: any positive scale represents it exactly
    xmin, xmax = xmin.masked_fill(flat, -1.0), xmax.masked_fill(flat, 1.0)
    scale = (xmax - xmin) / maxq
    if symmetric:
        zero = torch.zeros_like(scale) + (maxq + 1) // 2
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int | torch.Tensor) -> torch.Tensor:
    # Two clamps: torch.clamp takes a tensor bound only with a tensor for the other one too.
    return (torch.round(w / scale) + zero).clamp_(min=0).clamp_(max=maxq)


def rtn_quantize(W: torch.Tensor, fmt: QuantFormat) -> QuantizedWeight:
    """Round every weight to the nearest point of its group's min-max grid."""
    Wf = W.detach().float()
    g = fmt.group_index(W.shape[1], W.device)
    idx = g.expand_as(Wf)
    # Starting the reductions from 0 widens every group's range to include 0.
    empty = torch.zeros(W.shape[0], int(g[-1]) + 1, device=W.device)
    xmin = empty.scatter_reduce(1, idx, Wf, "amin")
    xmax = empty.scatter_reduce(1, idx, Wf, "amax")
    scale, zero = _fit_grid(xmin, xmax, fmt.maxq, fmt.symmetric)
    codes = _codes(Wf, scale[:, g], zero[:, g], fmt.maxq)
    return QuantizedWeight(codes.to(torch.uint8), scale, zero.to(torch.uint8), fmt, W.dtype)


class GPTQ:
    """GPTQ (Frantar et al., 2023) for one layer, set up once for many formats.

    The constructor does the per-layer work shared by every format: the column order
    (act_order: descending diag(H), so the inputs with the most energy are quantised
    first while the most columns are left to absorb their error), a float32 copy of W
    in that order and Hinv, the upper Cholesky factor of the damped inverse Hessian.
    ``quantize`` runs the blocked sweep: each column is rounded to its group's grid and
    its error, scaled by 1 / Hinv_ii, is spread over the block's later columns through
    row i of Hinv; the block's errors update all later columns in one matrix product.
    ``quantize_many`` runs one sweep for several formats, with the same results.

    Group grids. Without act_order a group's grid is fitted when the sweep reaches its
    first column, on the weights as updated so far (the reference's default); blocks
    are then aligned to whole groups so that the fit sees every earlier update. With
    act_order the grids are fitted on the original W before the sweep ("static
    groups" in the reference), so that groups stay contiguous in the original column
    order, which is the layout export packs.

    Fixed sparsity (``keep``): quantising a pruned weight, the pruned weights are
    rounded to exactly 0 (code = zero point) whatever the updates made of them, and
    their error is spread like any rounding error, as in SparseGPT's joint
    sparsification and quantisation; grids are fitted on the kept weights only.
    """

    def __init__(
        self, W: torch.Tensor, H: torch.Tensor, damp: float = 0.01, block_size: int = 128, act_order: bool = False
    ):
        self.dtype = W.dtype
        H = H.to(W.device)
        self.perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
        if self.perm is not None:
            W, H = W[:, self.perm], H[self.perm][:, self.perm]
        self.W = W.detach().to(torch.float32).clone()
        self.W[:, torch.diagonal(H) == 0] = 0  # inputs that never fired: their weights carry nothing (the reference's)
        self.Hinv = damped_inverse_cholesky(H, damp)
        self.block_size = block_size

    def quantize(self, fmt: QuantFormat, keep: torch.Tensor | None = None) -> QuantizedWeight:
        """The sweep in ``fmt``; ``keep`` (bool, W's shape): the weights allowed to be non-zero."""
        return self.quantize_many([fmt], keep)[0]

    def quantize_many(self, fmts: list[QuantFormat], keep: torch.Tensor | None = None) -> list[QuantizedWeight]:
        """``quantize`` in each of ``fmts``, with the same results as one at a time: the
        formats of one group size and grid type share one sweep."""
        sweeps = defaultdict(list)  # (group_size, symmetric) -> positions in fmts
        for position, fmt in enumerate(fmts):
            sweeps[fmt.group_size, fmt.symmetric].append(position)
        quantized = [None] * len(fmts)
        for positions in sweeps.values():
            for position, q in zip(positions, self._sweep([fmts[p] for p in positions], keep)):
                quantized[position] = q
        return quantized

    def _sweep(self, fmts: list[QuantFormat], keep: torch.Tensor | None) -> list[QuantizedWeight]:
        """The blocked sweep for formats of one group size and grid type.

        Rows are independent given Hinv (a row's updates use only Hinv and that row's own
        errors; grids are per row and group), so one copy of W per format is stacked along
        the rows and swept at once, each copy clamped to its own format's largest code:
        the sweep's many small per-column steps run once for all formats.
        """
        fmt = fmts[0]  # the group size and grid type of all
        rows, cols = self.W.shape
        stacked = len(fmts) * rows
        W, Hinv = self.W.repeat(len(fmts), 1), self.Hinv
        maxq = torch.tensor([f.maxq for f in fmts], dtype=W.dtype, device=W.device).repeat_interleave(rows)
        if keep is not None:
            keep = keep.to(W.device) if self.perm is None else keep.to(W.device)[:, self.perm]
            keep = keep.repeat(len(fmts), 1)
        g = fmt.group_index(cols, W.device)
        col_group = (g if self.perm is None else g[self.perm]).tolist()  # group of each swept column
        groups = int(g[-1]) + 1
        static = self.perm is not None or fmt.group_size is None
        # The sweep goes column by column, so it holds columns as rows (contiguous): the
        # block of W, its errors, the codes, grids and mask are all (columns, stacked rows).
        if static:
            idx = torch.as_tensor(col_group, device=W.device).expand_as(W)
            empty = torch.zeros(stacked, groups, device=W.device)
            kept = W if keep is None else W * keep
            xmin, xmax = empty.scatter_reduce(1, idx, kept, "amin"), empty.scatter_reduce(1, idx, kept, "amax")
            scales, zeros = _fit_grid(xmin.T, xmax.T, maxq, fmt.symmetric)
            bs = self.block_size
        else:
            scales = torch.empty(groups, stacked, device=W.device)
            zeros = torch.empty_like(scales)
            bs = fmt.group_size * max(1, self.block_size // fmt.group_size)
        keep = None if keep is None else keep.T.contiguous()
        codes = torch.empty(cols, stacked, dtype=torch.uint8, device=W.device)
        # Reused by every block: fresh large tensors cost a page fault per page on a CPU.
        block, errors, update = (torch.empty(min(bs, cols), stacked, device=W.device) for _ in range(3))

        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            W1, Err1 = block[: i2 - i1], errors[: i2 - i1]
            W1.copy_(W[:, i1:i2].T)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j = col_group[i1 + i]
                if not static and (i1 + i) % fmt.group_size == 0:
                    group = W1[i : i + fmt.group_size]
                    if keep is not None:
                        group = group * keep[i1 + i : i1 + i + fmt.group_size]
                    scales[j], zeros[j] = _fit_grid(group.amin(dim=0), group.amax(dim=0), maxq, fmt.symmetric)
                w = W1[i]
                c = _codes(w, scales[j], zeros[j], maxq)
                if keep is not None:
                    c = torch.where(keep[i1 + i], c, zeros[j])
                q = scales[j] * (c - zeros[j])
                err = torch.div(w - q, Hinv1[i, i], out=Err1[i])
                W1[i + 1 :] -= torch.mul(Hinv1[i, i + 1 :, None], err, out=update[: i2 - i1 - i - 1])
                codes[i1 + i] = c
            # A matrix product's rounding may depend on its shape, so each copy gets the
            # product it would get alone: a format's result does not depend on what
            # shares its sweep.
            Err1 = Err1.T.contiguous()
            for r in range(0, stacked, rows):
                W[r : r + rows, i2:] -= Err1[r : r + rows] @ Hinv[i1:i2, i2:]

        if self.perm is not None:
            codes = codes[torch.argsort(self.perm)]

        def copy_of(t: torch.Tensor, k: int) -> torch.Tensor:  # the k-th copy's rows, as (rows, columns)
            return t[:, k * rows : (k + 1) * rows].T.contiguous()

        return [
            QuantizedWeight(copy_of(codes, k), copy_of(scales, k), copy_of(zeros, k).to(torch.uint8), f, self.dtype)
            for k, f in enumerate(fmts)
        ]


# --- from dequantised values back to codes (export packs them; healing trains on the grid) ------

def recover_grid(W: torch.Tensor, fmt: QuantFormat) -> tuple[QuantizedWeight, torch.Tensor]:
    """The grid of ``fmt`` that the weights lie on, and which (row, group)s lie on it exactly.

    A quantised weight holds values s (c - z) with integer codes c in [0, 2^bits - 1]. Per
    group, the finest such grid holding every value (within the rounding of W's dtype) is
    found by trying the scales A / k for k from the most codes down: A is the group's range
    widened to 0 (asymmetric) or its largest magnitude (symmetric, zero point 2^(bits-1)).
    A group on no grid of the format gets round-to-nearest's min-max grid. The scale A / k
    is the original one only up to float rounding, so a recovered grid reproduces the
    weights within their dtype's rounding, not bit for bit.
    """
    Wf = W.detach().float()
    rows, columns = Wf.shape
    g = fmt.group_index(columns, Wf.device)
    index = g.expand_as(Wf)
    groups = int(g[-1]) + 1
    zeros_ = torch.zeros(rows, groups, device=Wf.device)
    xmin = zeros_.scatter_reduce(1, index, Wf, "amin")  # widened to include 0
    xmax = zeros_.scatter_reduce(1, index, Wf, "amax")
    tolerance = 3 * torch.finfo(W.dtype).eps * Wf.abs()
    fallback = rtn_quantize(Wf, fmt)
    scales, zeros, found = fallback.scales, fallback.zeros.float(), torch.zeros_like(zeros_, dtype=torch.bool)
    half = fmt.symmetric_zero
    anchor = torch.maximum(-xmin, xmax) if fmt.symmetric else xmax - xmin
    for k in range(half if fmt.symmetric else fmt.maxq, 0, -1):
        s = (anchor / k).masked_fill(anchor == 0, 1.0)
        z = torch.full_like(s, half) if fmt.symmetric else torch.round(-xmin / s)
        c = torch.round(Wf / s[:, g]) + z[:, g]
        ok = (c >= 0) & (c <= fmt.maxq) & ((s[:, g] * (c - z[:, g]) - Wf).abs() <= tolerance)
        exact = torch.ones_like(s).scatter_reduce(1, index, ok.float(), "amin").bool() & ~found
        scales, zeros, found = torch.where(exact, s, scales), torch.where(exact, z, zeros), found | exact
    codes = _codes(Wf, scales[:, g], zeros[:, g], fmt.maxq)
    return QuantizedWeight(codes.to(torch.uint8), scales, zeros.to(torch.uint8), fmt, W.dtype), found
