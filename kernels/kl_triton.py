"""Triton kernels for KL(teacher || student) over the vocabulary (the design is in ``kl.py``).

One program streams one row. The student's normaliser is an online log-sum-exp under a
running maximum ``m``: the maximum is reduced once per tile, and the per-lane sums are
rescaled by ``exp(m_old - m_new)``, one exponential per element. The teacher terms are
accumulated under the same running maximum, as ``p (t - (s - m))`` (corrected by
``(m_new - m_old) * sum p`` when it moves):

    KL = sum p (t - (s - m)) + (sum p) * log sum exp(s - m)

so each term is a difference of two log-probabilities, exact where p is large, whatever
the logits' offset. With KL ~3e-4 a row (a good candidate) the result lands within 1e-3
of float64, where the float32 reference is 1e-2 off at a 49,152 vocabulary.

Terms with teacher probability 0 contribute 0 (``0 log 0 = 0``): vocabulary padding with
``-inf`` in both is inert. Inputs may be float32, float16 or bfloat16; everything is
accumulated in float32.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

LOWEST = tl.constexpr(-3.4028234663852886e38)  # the first running maximum: finite, so -inf logits give no NaN
TAIL_TINY = tl.constexpr(1e-20)  # a tail sum under this (about exp(-46)) is summed again under its own maximum


@triton.jit
def _kl_rows(teacher, student, out, V, teacher_stride, student_stride, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    teacher += row * teacher_stride
    student += row * student_stride
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), LOWEST, tl.float32)  # running maximum of the student logits
    z = tl.zeros((BLOCK_V,), tl.float32)  # sum exp(s - m)
    a = tl.zeros((BLOCK_V,), tl.float32)  # sum p (t - (s - m))
    b = tl.zeros((BLOCK_V,), tl.float32)  # sum p
    for start in range(0, V, BLOCK_V):
        inside = start + cols < V
        t = tl.load(teacher + start + cols, mask=inside, other=float("-inf")).to(tl.float32)
        s = tl.load(student + start + cols, mask=inside, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        d = s - m_new
        z = z * tl.exp(m - m_new) + tl.exp(d)
        p = tl.exp(t)
        a += (m_new - m) * b + tl.where(p > 0, p * (t - d), 0.0)
        b += p
        m = m_new
    tl.store(out + row, tl.sum(a, axis=0) + tl.sum(b, axis=0) * tl.log(tl.sum(z, axis=0)))


@triton.jit
def _mark_top_k(indices, words, K, index_stride, word_stride, BLOCK_K: tl.constexpr):
    """Set bit ``i % 32`` of word ``i // 32`` of the row for every top-k index ``i``."""
    row = tl.program_id(0).to(tl.int64)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        i = tl.load(indices + row * index_stride + ks, mask=ks < K, other=0).to(tl.int32)
        tl.atomic_or(words + row * word_stride + (i >> 5), 1 << (i & 31), mask=ks < K, sem="relaxed")


@triton.jit
def _student_tile(student, words, c, V):
    """The student logits of columns ``c`` (float32, -inf past V) and whether each is in the top k."""
    s = tl.load(student + c, mask=c < V, other=float("-inf")).to(tl.float32)
    top = ((tl.load(words + (c >> 5), mask=c < V, other=0) >> (c & 31)) & 1) != 0
    return s, top


@triton.jit
def _kl_rows_topk(top_t, indices, tail_t, student, words, out, V, K, top_stride, index_stride,
                  student_stride, word_stride, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    student += row * student_stride
    words += row * word_stride
    cols = tl.arange(0, BLOCK_V)
    # One pass over the student row: the log-sum-exp over all tokens and over the tail
    # (the tokens outside the teacher's top k, told apart by the bit mask).
    m = tl.full((), LOWEST, tl.float32)
    z = tl.zeros((BLOCK_V,), tl.float32)
    z_tail = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        s, top = _student_tile(student, words, start + cols, V)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(s - m_new)
        z = z * alpha + e
        z_tail = z_tail * alpha + tl.where(top, 0.0, e)
        m = m_new
    log_z = tl.log(tl.sum(z, axis=0))  # log normaliser, less m
    tail_sum = tl.sum(z_tail, axis=0)
    tail_lse = m + tl.log(tail_sum)
    if tail_sum < TAIL_TINY:
        # The tail lies more than ~46 nats under the maximum, where exp(s - m) loses
        # precision and then underflows: take its log-sum-exp under its own maximum.
        m_tail = tl.full((), LOWEST, tl.float32)
        for start in range(0, V, BLOCK_V):
            s, top = _student_tile(student, words, start + cols, V)
            m_tail = tl.maximum(m_tail, tl.max(tl.where(top, float("-inf"), s), axis=0))
        z_tail = tl.zeros((BLOCK_V,), tl.float32)
        for start in range(0, V, BLOCK_V):
            s, top = _student_tile(student, words, start + cols, V)
            z_tail += tl.where(top, 0.0, tl.exp(s - m_tail))
        tail_lse = m_tail + tl.log(tl.sum(z_tail, axis=0))
    # The top-k terms, gathered from the student row under the final maximum.
    a = tl.zeros((BLOCK_K,), tl.float32)
    b = tl.zeros((BLOCK_K,), tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        t = tl.load(top_t + row * top_stride + ks, mask=ks < K, other=float("-inf")).to(tl.float32)
        i = tl.load(indices + row * index_stride + ks, mask=ks < K, other=0)
        s = tl.load(student + i, mask=ks < K, other=0.0).to(tl.float32)
        p = tl.exp(t)
        a += tl.where(p > 0, p * (t - (s - m)), 0.0)
        b += p
    kl = tl.sum(a, axis=0) + tl.sum(b, axis=0) * log_z
    t = tl.load(tail_t + row).to(tl.float32)
    p = tl.exp(t)
    s_tail = tail_lse - m - log_z  # the student's tail log-probability
    finite = (t > float("-inf")) & (t < float("inf"))
    kl += tl.where(finite & (p > 0), p * (t - s_tail), 0.0)
    tl.store(out + row, kl)


def _launch(block_v: int | None, num_warps: int | None, V: int) -> tuple[int, int]:
    """Tiles of up to 1,024 columns, 8 to a thread (one 16-byte load of bfloat16).

    Measured on an H200 with a 49,152 vocabulary (``benchmarks/kl_kernel.py --sweep`` and
    ``benchmarks/fused_kernels.py`` at 7a5003e): 1,024 columns and 4 warps beat 2,048 and 4 by
    9% at 16,384 rows and 16% at 2,048; smaller tiles or fewer warps do not help.
    """
    block_v = block_v or min(1024, triton.next_power_of_2(V))
    return block_v, num_warps or max(1, min(32, block_v // 256))


def kl_per_row(teacher_logprobs: torch.Tensor, student_logits: torch.Tensor, *, out: torch.Tensor | None = None,
               block_v: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """KL(p || q) of each row, float32: p = exp(teacher_logprobs), q = softmax(student_logits), both (N, V).

    ``out`` (N,) float32 receives the result if given; ``block_v`` (a power of two) and
    ``num_warps`` override the launch shape.
    """
    if teacher_logprobs.shape != student_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"teacher {tuple(teacher_logprobs.shape)} and student {tuple(student_logits.shape)} "
                         "must be the same (rows, vocabulary) shape")
    teacher, student = _rows(teacher_logprobs), _rows(student_logits)
    N, V = student.shape
    out = torch.empty(N, dtype=torch.float32, device=student.device) if out is None else out
    block_v, num_warps = _launch(block_v, num_warps, V)
    if N:
        with _device(student):
            _kl_rows[(N,)](teacher, student, out, V, teacher.stride(0), student.stride(0), BLOCK_V=block_v,
                           num_warps=num_warps)
    return out


def top_k_bitmask(top_indices: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, ceil(V / 32)) int32: bit ``i % 32`` of word ``i // 32`` is set for each index ``i`` of a row."""
    indices = _rows(top_indices)
    N, K = indices.shape
    words = torch.zeros(N, triton.cdiv(vocab_size, 32), dtype=torch.int32, device=indices.device)
    if N and K:
        with _device(indices):
            _mark_top_k[(N,)](indices, words, K, indices.stride(0), words.stride(0),
                              BLOCK_K=min(1024, triton.next_power_of_2(K)))
    return words


def kl_topk_per_row(top_logprobs: torch.Tensor, top_indices: torch.Tensor, tail_logprob: torch.Tensor,
                    student_logits: torch.Tensor, *, out: torch.Tensor | None = None, block_v: int | None = None,
                    num_warps: int | None = None) -> torch.Tensor:
    """Each row's KL between teacher and student coarsened to (top-k tokens, the rest), float32.

    As ``evosearch.evaluate.kl_divergence_topk``, per row: ``top_logprobs`` and
    ``top_indices`` (N, k) (the indices distinct within a row), ``tail_logprob`` (N,),
    ``student_logits`` (N, V).
    """
    N = student_logits.shape[0]
    if (student_logits.dim() != 2 or top_logprobs.shape != top_indices.shape or top_indices.shape[0] != N
            or tail_logprob.shape != (N,)):
        raise ValueError(f"top-k {tuple(top_logprobs.shape)}, indices {tuple(top_indices.shape)}, tail "
                         f"{tuple(tail_logprob.shape)} and student {tuple(student_logits.shape)}: expected "
                         "(N, k), (N, k), (N,) and (N, V)")
    top, indices, student = _rows(top_logprobs), _rows(top_indices), _rows(student_logits)
    tail = tail_logprob.contiguous()
    V, K = student.shape[1], indices.shape[1]
    words = top_k_bitmask(indices, V)
    out = torch.empty(N, dtype=torch.float32, device=student.device) if out is None else out
    block_v, num_warps = _launch(block_v, num_warps, V)
    if N:
        with _device(student):
            _kl_rows_topk[(N,)](top, indices, tail, student, words, out, V, K, top.stride(0), indices.stride(0),
                                student.stride(0), words.stride(0), BLOCK_V=block_v,
                                BLOCK_K=min(1024, triton.next_power_of_2(max(K, 1))), num_warps=num_warps)
    return out


def _device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (cuda:1 with cuda:0 current)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose rows the kernels can walk: unit stride along the last dimension."""
    return x if x.stride(-1) == 1 else x.contiguous()
