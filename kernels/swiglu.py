"""The gated MLP's input side, ``silu(x @ Wg.T) * (x @ Wu.T)``, as one matrix-product kernel.

Llama-family MLPs compute ``down(silu(gate(x)) * up(x))``. Run as PyTorch does it, the gate
and up products each write a (tokens x intermediate) tensor and an elementwise kernel reads
both back to write a third: for SmolLM2-135M at 65,536 tokens that is 0.6 GB of traffic per
block, about as long as the products themselves take (the largest non-matmul kernel of the
compiled fitness, 4.2 ms of 47 on an H200). ``swiglu`` computes both products tile by tile
with two accumulators that share the loaded tile of x, and applies the activation and the
product as the epilogue, writing only the result.

Values: each accumulator is rounded to the activation dtype before the epilogue, and the
activation's output too, as the unfused modules round their outputs; results differ from
them only where cuBLAS sums the products in another order.

``swiglu`` runs the Triton kernel for float16/bfloat16 CUDA tensors when Triton is
installed, and the PyTorch reference anywhere else. It is registered as the operator
``evosearch::swiglu``, so ``torch.compile`` calls it as one opaque kernel and CUDA graphs
capture it. ``TRITON_INTERPRET=1`` runs the kernel on a CPU (tests).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the PyTorch reference serves every device
    triton = None


def swiglu_reference(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """``silu(x @ gate_weight.T) * (x @ up_weight.T)``, each step rounded to x's dtype as the modules do."""
    return F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight)


@torch.library.custom_op("evosearch::swiglu", mutates_args=())
def swiglu(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """``silu(x @ gate_weight.T) * (x @ up_weight.T)`` for x (..., d) and weights (n, d): (..., n)."""
    if not use_triton(x):
        return swiglu_reference(x, gate_weight, up_weight)
    return swiglu_triton(x, gate_weight, up_weight)


def use_triton(x: torch.Tensor) -> bool:
    """Whether ``swiglu`` runs the kernel on x: a float16/bfloat16 CUDA tensor, with Triton installed."""
    return x.is_cuda and triton is not None and x.dtype in (torch.float16, torch.bfloat16)


@swiglu.register_fake
def _(x, gate_weight, up_weight):
    return x.new_empty((*x.shape[:-1], gate_weight.shape[0]))


if triton is not None:

    @triton.jit
    def _swiglu_kernel(x, wg, wu, out, M, N, K, sxm, swn, som, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, IEEE: tl.constexpr):
        # Grouped order: GROUP_M row blocks in turn take each column block, so the weight
        # tiles they share are read from L2, not from memory.
        pid = tl.program_id(0)
        grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * grid_n)
        first_m = group * GROUP_M
        rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * grid_n)) % rows_in_group
        pid_n = (pid % (GROUP_M * grid_n)) // rows_in_group
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        x_tile = x + rm[:, None].to(tl.int64) * sxm + rk[None, :]
        g_tile = wg + rn[None, :].to(tl.int64) * swn + rk[:, None]  # (BLOCK_K, BLOCK_N): the weight transposed
        u_tile = wu + rn[None, :].to(tl.int64) * swn + rk[:, None]
        gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        precision: tl.constexpr = "ieee" if IEEE else "tf32"
        for k in range(0, K, BLOCK_K):
            k_in = k + rk < K
            a = tl.load(x_tile, mask=(rm[:, None] < M) & k_in[None, :], other=0.0)
            g = tl.load(g_tile, mask=k_in[:, None] & (rn[None, :] < N), other=0.0)
            u = tl.load(u_tile, mask=k_in[:, None] & (rn[None, :] < N), other=0.0)
            if IEEE:  # float32 inputs, or the interpreter, whose bfloat16 products are wrong (Triton 3.9)
                a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
            gate = tl.dot(a, g, gate, input_precision=precision)
            up = tl.dot(a, u, up, input_precision=precision)
            x_tile += BLOCK_K
            g_tile += BLOCK_K
            u_tile += BLOCK_K
        dtype = out.dtype.element_ty
        gate = gate.to(dtype).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        y = act * up.to(dtype).to(tl.float32)
        tl.store(out + rm[:, None].to(tl.int64) * som + rn[None, :], y.to(dtype),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): two (BLOCK_M x BLOCK_N) float32
# accumulators live in registers, so the tiles are half what one product would take.
DEFAULT_CONFIG = (128, 128, 64, 8, 3)


def swiglu_triton(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, *,
                  config: tuple[int, int, int, int, int] | None = None, group_m: int = 8) -> torch.Tensor:
    """The Triton kernel itself (any device under ``TRITON_INTERPRET=1``); ``config`` overrides the tiles."""
    N, K = gate_weight.shape
    if up_weight.shape != (N, K) or x.shape[-1] != K:
        raise ValueError(f"x {tuple(x.shape)}, gate {tuple(gate_weight.shape)} and up {tuple(up_weight.shape)}: "
                         "expected (..., d), (n, d) and (n, d)")
    rows = x.reshape(-1, K)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    wg, wu = gate_weight.contiguous(), up_weight.contiguous()
    M = rows.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, warps, stages = config or DEFAULT_CONFIG
    if M:
        grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _swiglu_kernel[grid](rows, wg, wu, out, M, N, K, rows.stride(0), wg.stride(0), out.stride(0),
                                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
                                 IEEE=x.dtype == torch.float32 or INTERPRETED, num_warps=warps, num_stages=stages)
    return out.reshape(*x.shape[:-1], N)

