"""Packed integer weights: their bit layout, and the dequantising matmul that reads it.

Layout (compressed-tensors' "pack-quantized" format, dense packing, any bit-width 1..8):
the unsigned codes of one weight row, column 0 first, form one little-endian bit stream,
code ``c`` at bits ``[c * bits, (c + 1) * bits)``; the stream is cut into int32 words
(bit 0 of word ``j`` is stream bit ``32 j``) and its last word is padded with zeros, so a
row takes ``ceil(columns * bits / 32)`` words. For 4 and 8 bits no code crosses a word
(8 or 4 codes per word), which is the layout vLLM's int4/int8 weight-only kernels read.

The weight is ``W[r, c] = scale[r, g] * (code[r, c] - zero[r, g])`` with ``g = c //
group_size`` (one group per row when ``group_size`` is None), computed in float32 and
rounded once to the activation dtype, exactly as ``QuantizedWeight.dequantize`` does.

``dequant_matmul(x, w)`` computes ``x @ W.T`` without materialising W when it can: on a
CUDA device a Triton kernel unpacks tiles of codes next to the tensor-core product (for
up to ``FUSED_MAX_ROWS`` rows of x: decoding); for longer inputs (prefill) a Triton
kernel writes W once and cuBLAS multiplies. Elsewhere the PyTorch reference does the
same arithmetic. ``TRITON_INTERPRET=1`` runs the Triton kernels on a CPU (tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the PyTorch reference serves every device
    triton = None

FUSED_MAX_ROWS = 64  # rows of x up to which the fused kernel beats dequantise-then-cuBLAS


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A linear layer's weight in packed form, ready for ``dequant_matmul``.

    ``packed``: int32 (out, ceil(in * bits / 32)); ``scales``: float32 (out, groups);
    ``zeros``: uint8 (out, groups), unpacked; ``shape``: (out, in).
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int | None
    shape: tuple[int, int]

    @property
    def group(self) -> int:
        """Columns per group (the whole row when group_size is None)."""
        return self.group_size or self.shape[1]


def words_per_row(columns: int, bits: int) -> int:
    return math.ceil(columns * bits / 32)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (rows, columns), each < 2^bits, row by row into int32 words."""
    rows, columns = codes.shape
    words = words_per_row(columns, bits)
    start = torch.arange(columns, device=codes.device) * bits
    value = codes.to(torch.int64)
    out = torch.zeros(rows, words + 1, dtype=torch.int64, device=codes.device)
    # A code starting at bit s of word w spills its high bits into word w + 1.
    out.scatter_add_(1, (start // 32).expand(rows, -1), (value << (start % 32)) & 0xFFFFFFFF)
    out.scatter_add_(1, (start // 32 + 1).expand(rows, -1), value >> (32 - start % 32))
    out = out[:, :words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # reinterpret as signed int32


def unpack(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """The codes (rows, columns) as integers, from words packed by ``pack``."""
    if 32 % bits == 0:  # no code crosses a word: shift each word in place (the sign bits shifted in are masked off)
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
        codes = (packed[:, :, None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(packed.shape[0], -1)[:, :columns]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.nn.functional.pad(words, (0, 1))
    start = torch.arange(columns, device=packed.device) * bits
    low, high = words[:, start // 32], words[:, start // 32 + 1]
    return ((low | (high << 32)) >> (start % 32)) & ((1 << bits) - 1)


def dequantize_reference(w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """W (out, in) in ``dtype``, in PyTorch."""
    columns = w.shape[1]
    codes = unpack(w.packed, w.bits, columns).float()
    per_column = lambda t: t.repeat_interleave(w.group, dim=1)[:, :columns]  # noqa: E731 (group of each column)
    W = per_column(w.scales) * (codes - per_column(w.zeros.float()))
    return W.to(dtype)


def dequant_matmul_reference(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    return torch.nn.functional.linear(x, dequantize_reference(w, x.dtype))


def use_triton(x: torch.Tensor) -> bool:
    """The Triton path serves CUDA tensors; tests run its kernels in the interpreter directly."""
    return triton is not None and x.is_cuda


def dequant_matmul(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """``x @ W.T`` for x of shape (..., in); the Triton path where it runs, else the reference."""
    if not use_triton(x):
        return dequant_matmul_reference(x, w)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= FUSED_MAX_ROWS:
        out = fused_matmul(rows, w)
    else:
        out = torch.nn.functional.linear(rows, dequantize(w, x.dtype))
    return out.reshape(*x.shape[:-1], w.shape[0])


if triton is not None:

    @triton.jit
    def _codes(packed_ptr, words, rows, cols, BITS: tl.constexpr):
        """Codes at (rows[:, None], cols[None, :]): two words hold each (the second only when it spills)."""
        bit = cols * BITS
        word = bit // 32
        shift = (bit % 32).to(tl.uint32)
        row_start = rows[:, None] * words
        low = tl.load(packed_ptr + row_start + word[None, :]).to(tl.uint32, bitcast=True)
        high = tl.load(packed_ptr + row_start + word[None, :] + 1, mask=(word + 1 < words)[None, :], other=0)
        high = high.to(tl.uint32, bitcast=True)
        # (high << 1) << (31 - shift) is high << (32 - shift) without a shift by 32 when shift is 0.
        value = (low >> shift[None, :]) | ((high << 1) << (31 - shift)[None, :])
        return (value & ((1 << BITS) - 1)).to(tl.int32)

    @triton.jit
    def _fused_kernel(x_ptr, packed_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K, words, groups, group,
                      stride_xm, stride_om, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_n = tl.minimum(offs_n, N - 1)  # clamped for loads; stores are masked
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            cols = tl.minimum(offs_k, K - 1)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            codes = _codes(packed_ptr, words, rows_n, cols, BITS)
            g = cols // group
            scale = tl.load(scales_ptr + rows_n[:, None] * groups + g[None, :])
            zero = tl.load(zeros_ptr + rows_n[:, None] * groups + g[None, :]).to(tl.int32)
            w = (scale * (codes - zero).to(tl.float32)).to(x.dtype)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit
    def _dequantize_kernel(packed_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, words, groups, group,
                           BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        rows_n, cols = tl.minimum(offs_n, N - 1), tl.minimum(offs_k, K - 1)
        codes = _codes(packed_ptr, words, rows_n, cols, BITS)
        g = cols // group
        scale = tl.load(scales_ptr + rows_n[:, None] * groups + g[None, :])
        zero = tl.load(zeros_ptr + rows_n[:, None] * groups + g[None, :]).to(tl.int32)
        w = scale * (codes - zero).to(tl.float32)
        tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


def fused_matmul(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """``x @ W.T`` for a 2-D x, codes unpacked tile by tile inside the product (Triton)."""
    x = x.contiguous()
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k = 16, 64, 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _fused_kernel[grid](x, w.packed, w.scales, w.zeros, out, M, N, K, w.packed.shape[1], w.scales.shape[1],
                        w.group, x.stride(0), out.stride(0), BITS=w.bits, BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=block_k, IEEE=x.dtype == torch.float32)
    return out


def dequantize(w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """W (out, in) in ``dtype``, written by one Triton kernel."""
    N, K = w.shape
    out = torch.empty(N, K, device=w.packed.device, dtype=dtype)
    block_n, block_k = 32, 64
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _dequantize_kernel[grid](w.packed, w.scales, w.zeros, out, N, K, w.packed.shape[1], w.scales.shape[1], w.group,
                             BITS=w.bits, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
