"""KL(teacher || student) over the vocabulary: the fused Triton kernel where it runs, else PyTorch.

``kl_divergence`` and ``kl_divergence_topk`` take the arguments of their PyTorch references
(``kl_divergence_reference``, ``kl_divergence_topk_reference``, below; ``evosearch.evaluate``
calls them ``kl_divergence``, ``kl_divergence_topk``) and return the same sum over rows. On CUDA
tensors with Triton installed they run the kernels of ``kl_triton.py``; anywhere else
(a CPU, no Triton) they call those references.

What the kernel saves. The reference materialises, in float32, the student's
log-softmax, the teacher's probabilities and their product: several full (rows x vocab)
tensors written and read again. The kernel reads each input once, the teacher's
log-probs and the student's logits in their stored precision (bfloat16 logits straight
from the output head), and writes one float per row: the floor is the bytes of the two
inputs over memory bandwidth. On an H200 (4.3 TB/s measured copy bandwidth) with a
49,152 vocabulary and a float16 teacher that is 197 KB, 46 ns a row: 94 us for the 2,048
rows ``Teacher.kl`` hands over at once. The top-k variant reads the student's row (and a
bit mask of the top k, V/8 bytes) and only k teacher entries, about half the bytes. The
arithmetic, two exponentials per element, stays under the chip's rate of exponentials
(~4.2e12/s) at that bandwidth, one for top-k.

Why the output head is not fused in as well. Computing the logits tile by tile inside
a kernel (hidden @ W^T, with the online KL as the matrix product's epilogue) skips writing
and reading back the bfloat16 logits, and the estimate (for SmolLM2-135M's d=576, a
Triton product at ~80% of cuBLAS) was a few percent either way. It was built and measured
(commit 7a5003e, reverted): on an H200 at 16,384 rows the fused kernel took 4.0-6.8 ms
over eight tile shapes against 2.55 ms for cuBLAS's head then this kernel; its product ran
at ~230 TFLOP/s, the epilogue's reductions and exponentials after each short (K = 576)
matrix loop not overlapping it. So the head stays on cuBLAS.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

log = logging.getLogger("evosearch")


def kl_divergence_reference(teacher_logprobs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(p || q) with p = exp(teacher_logprobs), q = softmax(student_logits).

    The plain PyTorch reference (``evosearch.evaluate.kl_divergence``); ``kl_divergence`` below is the
    fused GPU version tested against it, which ``Teacher.kl`` calls.
    """
    t = teacher_logprobs.float()
    s = torch.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum()


def kl_divergence_topk_reference(top_logprobs: torch.Tensor, top_indices: torch.Tensor, tail_logprob: torch.Tensor,
                       student_logits: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL between teacher and student coarsened to (top-k tokens, the rest).

    Both tails are taken as log-sum-exps over the tokens outside the teacher's top k (not
    as 1 - sum of the top k, which cancels catastrophically when the tail is tiny).
    """
    logits = student_logits.float()
    index = top_indices.long()
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    s = logits.gather(-1, index) - log_norm
    s_tail = torch.logsumexp(logits.scatter(-1, index, float("-inf")), dim=-1) - log_norm.squeeze(-1)
    t = top_logprobs.float()
    t_tail = tail_logprob.float()
    tail = torch.where(torch.isfinite(t_tail), t_tail.exp() * (t_tail - s_tail), torch.zeros_like(t_tail))
    return (t.exp() * (t - s)).sum() + tail.sum()


def kl_divergence(teacher_logprobs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(p || q), p = exp(teacher_logprobs), q = softmax(student_logits), float32.

    As ``evosearch.evaluate.kl_divergence`` (inputs (..., V) of any float dtype), except that
    the kernel takes ``0 log 0 = 0`` where the reference gives NaN for a teacher log-prob of -inf.
    """
    if not _fused(student_logits):
        return kl_divergence_reference(teacher_logprobs, student_logits)
    from . import kl_triton  # here: it needs triton, which CPU-only installs lack

    V = student_logits.shape[-1]
    return kl_triton.kl_per_row(teacher_logprobs.reshape(-1, V), student_logits.reshape(-1, V)).sum()


def kl_divergence_topk(top_logprobs: torch.Tensor, top_indices: torch.Tensor, tail_logprob: torch.Tensor,
                       student_logits: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL between teacher and student coarsened to (top-k tokens, the rest), float32.

    As ``evosearch.evaluate.kl_divergence_topk``: the indices of a row must be distinct (as
    ``topk`` gives them), and the student's tail is a log-sum-exp over the other tokens.
    """
    if not _fused(student_logits):
        return kl_divergence_topk_reference(top_logprobs, top_indices, tail_logprob, student_logits)
    from . import kl_triton

    V, k = student_logits.shape[-1], top_indices.shape[-1]
    return kl_triton.kl_topk_per_row(top_logprobs.reshape(-1, k), top_indices.reshape(-1, k),
                                     tail_logprob.reshape(-1), student_logits.reshape(-1, V)).sum()


def _fused(student_logits: torch.Tensor) -> bool:
    """Whether the Triton kernel runs on these logits: on a CUDA device, with Triton installed."""
    if not student_logits.is_cuda:
        return False
    if not _triton_installed():
        _warn_no_triton()
        return False
    return True


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _warn_no_triton() -> None:
    log.warning("Triton is not installed: the KL divergence on the GPU falls back to PyTorch, which "
                "reads and writes several (rows x vocabulary) float32 tensors per call (pip install triton)")
