"""Time the fused KL kernels (kernels/kl.py) against PyTorch, after checking them against float64.

    PYTHONPATH=. python benchmarks/kl_kernel.py --out kl_kernel.md [--sweep]   # on a CUDA GPU, < 1 min
    PYTHONPATH=. python benchmarks/kl_kernel.py --device cpu --tiny           # the checks alone, in Triton's interpreter

For 4K, 16K and 64K rows of a 49,152 vocabulary (SmolLM2's), bfloat16 student logits
against a teacher stored as float16 or bfloat16 log-probs, or as its top 256 (float32
values, int32 indices, a tail log-prob). Each case is first checked: the kernel's per-row
KL (written over a NaN-poisoned output) and PyTorch's float32 result against float64, by
relative error over the rows. Then both are timed with CUDA events (``do_bench``, median):
the kernel through the dispatcher ``Teacher.kl`` calls (the top-k bit mask included), and
PyTorch as ``evosearch.evaluate``'s references compute it (float32 log-softmax and KL).
Bandwidth counts the inputs read once (teacher and student), against a device-to-device
copy measured in the same run. For the question of fusing the output head as well
(kernels/kl.py), the cuBLAS head for d=576 (SmolLM2-135M) is timed at the same rows.
``--sweep`` adds the kernels' launch shapes at 16K rows. The markdown table goes to
``--out`` and is printed last.

Predicted: the kernel near the copy bandwidth, 3.0 ms for 64K rows with a float16 teacher
(12.9 GB) and half that for top-k; PyTorch moves some 60 bytes an element (float32 copies,
log-softmax, exp, difference, product, sum) against the kernel's 4, so 10-15x slower.

It imports the kernels as ``evosearch.kernels`` (``kernels/`` is a namespace folder, so that
it never shadows the PyPI package ``kernels`` that transformers imports) and writes out the
PyTorch formulas of those references, in float32 to time and in float64 for the truth.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

VOCAB, TOP_K, HIDDEN = 49152, 256, 576
ROWS = [4096, 16384, 65536]
TINY = dict(vocab=1000, top_k=16, rows=[3, 7])
CHUNK = 2048  # rows at a time for the float64 truth and the data
TOLERANCE = 1e-4  # the kernel against float64: float32 arithmetic on exact inputs lands near 1e-6
SWEEP = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)]  # (block_v, num_warps)


def torch_kl(teacher, student, dtype):
    """Per-row KL as ``evosearch.evaluate.kl_divergence`` computes it, in ``dtype``."""
    t = teacher.to(dtype)
    return (t.exp() * (t - torch.log_softmax(student.to(dtype), -1))).sum(-1)


def torch_kl_topk(values, indices, tail, student, dtype):
    """Per-row top-k KL as ``evosearch.evaluate.kl_divergence_topk`` computes it, in ``dtype``."""
    s, index = student.to(dtype), indices.long()
    log_z = torch.logsumexp(s, -1, keepdim=True)
    s_top = s.gather(-1, index) - log_z
    s_tail = torch.logsumexp(s.scatter(-1, index, float("-inf")), -1) - log_z.squeeze(-1)
    t, t_tail = values.to(dtype), tail.to(dtype)
    tail_term = torch.where(torch.isfinite(t_tail), t_tail.exp() * (t_tail - s_tail), torch.zeros_like(t_tail))
    return (t.exp() * (t - s_top)).sum(-1) + tail_term


def chunked(fn, *tensors, dtype):
    return torch.cat([fn(*(x[i : i + CHUNK] for x in tensors), dtype) for i in range(0, len(tensors[0]), CHUNK)])


def relative_error(out, truth):
    return ((out.double() - truth).norm() / truth.norm()).item()


def make_case(rows, vocab, top_k, device, seed):
    """Student logits (bf16) near random teacher logits; the teacher as fp16, bf16 and top-k."""
    g = torch.Generator(device).manual_seed(seed)
    student = torch.empty(rows, vocab, device=device, dtype=torch.bfloat16)
    teacher = {dtype: torch.empty(rows, vocab, device=device, dtype=dtype) for dtype in (torch.float16, torch.bfloat16)}
    values = torch.empty(rows, top_k, device=device)
    indices = torch.empty(rows, top_k, device=device, dtype=torch.int32)
    tail = torch.empty(rows, device=device)
    for i in range(0, rows, CHUNK):
        base = torch.randn(min(CHUNK, rows - i), vocab, device=device, generator=g) * 4
        student[i : i + CHUNK] = base + 0.5 * torch.randn(base.shape, device=device, generator=g)
        logp = torch.log_softmax(base, -1)
        for stored in teacher.values():
            stored[i : i + CHUNK] = logp
        top, index = logp.topk(top_k, -1)
        values[i : i + CHUNK], indices[i : i + CHUNK] = top, index
        tail[i : i + CHUNK] = torch.logsumexp(logp.scatter(-1, index, float("-inf")), -1)
    return student, teacher, (values, indices, tail)


def check(name, fused, truth, reference):
    """Relative errors of the kernel and of PyTorch's float32 against float64; fails loudly."""
    if not fused.isfinite().all():
        raise SystemExit(f"{name}: the kernel left {int((~fused.isfinite()).sum())} rows NaN or infinite")
    errors = relative_error(fused, truth), relative_error(reference, truth)
    if errors[0] > TOLERANCE:
        raise SystemExit(f"{name}: the kernel is {errors[0]:.1e} off float64 (tolerance {TOLERANCE:.0e})")
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (for the CPU interpreter)")
    parser.add_argument("--sweep", action="store_true", help="also time the kernels' launch shapes at 16K rows")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined, at import
    from evosearch.kernels import kl, kl_triton

    timed = args.device == "cuda"
    if timed:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=25, rep=100, return_mode="median")

        copy_bandwidth = measure_copy_bandwidth(bench)
    vocab, top_k, all_rows = (TINY["vocab"], TINY["top_k"], TINY["rows"]) if args.tiny else (VOCAB, TOP_K, ROWS)

    lines, head_lines = [], []
    for rows in all_rows:
        student, teachers, (values, indices, tail) = make_case(rows, vocab, top_k, args.device, seed=rows)
        cases = [(f"{str(dtype).removeprefix('torch.')} teacher", rows * vocab * (dtype.itemsize + 2),
                  lambda out, t=t: kl_triton.kl_per_row(t, student, out=out),
                  lambda t=t: kl.kl_divergence(t, student),
                  lambda t=t: torch_kl(t, student, torch.float32).sum(),
                  lambda dtype, t=t: chunked(torch_kl, t, student, dtype=dtype))
                 for dtype, t in teachers.items()]
        cases.append((f"top-{top_k} teacher", rows * vocab * 2 + rows * (top_k * 8 + 4),
                      lambda out: kl_triton.kl_topk_per_row(values, indices, tail, student, out=out),
                      lambda: kl.kl_divergence_topk(values, indices, tail, student),
                      lambda: torch_kl_topk(values, indices, tail, student, torch.float32).sum(),
                      lambda dtype: chunked(torch_kl_topk, values, indices, tail, student, dtype=dtype)))
        for name, n_bytes, per_row, dispatched, pytorch, formula in cases:
            fused = per_row(torch.full((rows,), float("nan"), device=args.device))
            kernel_error, pytorch_error = check(f"{rows} rows, {name}", fused, formula(torch.float64),
                                                formula(torch.float32))
            row = f"| {rows:,} | {name} | {n_bytes / 1e9:.2f} | {kernel_error:.1e} | {pytorch_error:.1e} |"
            if timed:
                ms_pytorch, ms_fused = bench(pytorch), bench(dispatched)
                row += (f" {ms_pytorch:.3f} | {ms_fused:.3f} | {ms_pytorch / ms_fused:.1f}x |"
                        f" {n_bytes / ms_fused / 1e6:,.0f} | {n_bytes / ms_fused / 1e9 / copy_bandwidth:.0%} |")
            lines.append(row)
            print(row, file=sys.stderr, flush=True)
        if timed:  # into the student's buffer, done with
            hidden = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
            head = torch.randn(vocab, HIDDEN, device="cuda", dtype=torch.bfloat16) / HIDDEN**0.5
            ms = bench(lambda: torch.mm(hidden, head.T, out=student))
            head_lines.append(f"| {rows:,} | {ms:.3f} | {2 * rows * vocab * HIDDEN / ms / 1e9:,.0f} |")
        del cases, student, teachers, values, indices, tail

    header = ["| rows | case | GB read | kernel err | PyTorch err |"]
    header.append("|---|---|---|---|---|")
    if timed:
        header[0] += " PyTorch ms | kernel ms | speed-up | kernel GB/s | of copy bandwidth |"
        header[1] += "---|---|---|---|---|"
    device_name = torch.cuda.get_device_name() if timed else "CPU (Triton interpreter)"
    table = [f"KL kernels on {device_name}, vocabulary {vocab:,}; errors are relative to float64 over the rows"
             + (f"; copy bandwidth measured {copy_bandwidth:.2f} TB/s (read + write)" if timed else "")
             + ".", "", *header, *lines]
    if timed:
        table += ["", f"The output head for d={HIDDEN} (cuBLAS, bfloat16 logits written): a kernel fusing head"
                  " and KL would have to beat this plus the KL kernel's time.", "", "| rows | head ms | TFLOP/s |",
                  "|---|---|---|", *head_lines]
    if timed and args.sweep:
        table += ["", f"Launch shapes at {ROWS[1]:,} rows (ms, median):", "",
                  "| block_v | num_warps | float16 teacher | top-256 teacher |", "|---|---|---|---|"]
        table += sweep(kl_triton, bench)
    text = "\n".join(table) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


def measure_copy_bandwidth(bench) -> float:
    """TB/s of a 2 GB device-to-device copy, counting the bytes read and written."""
    src = torch.randn(2**29, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.nbytes / ms / 1e9


def sweep(kl_triton, bench) -> list[str]:
    student, teachers, (values, indices, tail) = make_case(ROWS[1], VOCAB, TOP_K, "cuda", seed=1)
    teacher = teachers[torch.float16]
    lines = []
    for block_v, num_warps in SWEEP:
        full = bench(lambda: kl_triton.kl_per_row(teacher, student, block_v=block_v, num_warps=num_warps))
        top = bench(lambda: kl_triton.kl_topk_per_row(values, indices, tail, student, block_v=block_v,
                                                      num_warps=num_warps))
        lines.append(f"| {block_v} | {num_warps} | {full:.3f} | {top:.3f} |")
    return lines


if __name__ == "__main__":
    main()
