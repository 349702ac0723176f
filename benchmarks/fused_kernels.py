"""The fitness's fused kernels against what they replace, at the packaged model's shapes, with their tiles swept.

One batch of the GPU fitness is 8 sequences of 2,048 tokens (16,384 rows) of SmolLM2-135M
(d = 576, MLP width 1,536, vocabulary 49,152). For each kernel this times, on one GPU:

- the gated MLP's input side, ``silu(x @ Wg.T) * (x @ Wu.T)``: PyTorch's modules (two cuBLAS
  products and an elementwise kernel), the same through ``torch.compile``, and
  ``kernels/swiglu.py`` at several tile shapes;
- the output head and the KL: cuBLAS in chunks of 2,048 rows then the KL kernel (as the
  fitness ran them before), the same in one chunk, and the fused ``head_kl_per_row`` at
  several tile shapes;
- the KL kernel alone at several launch shapes (2,048 rows, a bfloat16 teacher);

with each result's relative difference from the unfused path, and writes a markdown table.

    python benchmarks/fused_kernels.py --out fused.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evosearch.kernels import kl_triton, swiglu  # noqa: E402

SWIGLU_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                  (128, 128, 32, 8, 4), (256, 64, 64, 8, 3), (64, 64, 64, 4, 4), (128, 64, 64, 8, 4)]
HEAD_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (64, 256, 64, 4, 3),
                (128, 64, 64, 4, 4), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4)]
KL_LAUNCHES = [(2048, 4), (2048, 8), (1024, 4), (1024, 2), (512, 2), (4096, 8)]


def milliseconds(fn, repeat: int = 20) -> float:
    """Median of ``repeat`` timed calls (CUDA events), after three to warm up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    M, d, n, V = args.rows, 576, 1536, 49152
    lines = [f"Fused kernels on {torch.cuda.get_device_name()}, torch {torch.__version__}, {date.today()}; "
             f"{M:,} rows, d {d}, MLP width {n}, vocabulary {V:,}, bfloat16. Command: "
             f"`python benchmarks/fused_kernels.py --rows {M}`.", ""]

    def section(title: str, header: str, rows: list[str]) -> None:
        lines.extend([f"**{title}**", "", header, "|" + "---|" * header.count("|", 1), *rows, ""])
        print("\n".join(lines[-len(rows) - 5 :]), file=sys.stderr)
        if args.out:
            Path(args.out).write_text("\n".join(lines))

    # The gated MLP's input side.
    x = torch.randn(M, d, device=dev, dtype=bf16)
    gate, up = (torch.randn(n, d, device=dev, dtype=bf16) / d**0.5 for _ in range(2))
    flop = 2 * 2 * M * n * d
    modules = swiglu.swiglu_reference(x, gate, up)
    compiled_fn = torch.compile(swiglu.swiglu_reference)
    rows = []
    for name, fn in [("PyTorch modules", lambda: swiglu.swiglu_reference(x, gate, up)),
                     ("torch.compile of the modules", lambda: compiled_fn(x, gate, up))]:
        ms = milliseconds(fn)
        rows.append(f"| {name} | {ms:.3f} | {flop / ms / 1e9:.0f} | {relative(fn(), modules):.1e} |")
    for config in SWIGLU_CONFIGS:
        try:
            fn = lambda c=config: swiglu.swiglu_triton(x, gate, up, config=c)  # noqa: E731
            ms = milliseconds(fn)
            rows.append(f"| kernel {config} | {ms:.3f} | {flop / ms / 1e9:.0f} | {relative(fn(), modules):.1e} |")
        except Exception as exc:  # a tile shape that does not fit this chip's shared memory, say
            rows.append(f"| kernel {config} | failed: {type(exc).__name__} | | |")
    section("silu(x Wg^T) * (x Wu^T)", "| variant (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) | ms | TFLOP/s | "
            "difference from the modules |", rows)

    # The output head and the KL.
    hidden = torch.randn(M, d, device=dev, dtype=bf16)
    weight = torch.randn(V, d, device=dev, dtype=bf16) * 3 / d**0.5
    teacher = torch.log_softmax((hidden @ weight.T).float() + 0.3 * torch.randn(M, V, device=dev), -1).to(bf16)
    flop = 2 * M * V * d

    def unfused(chunk: int) -> torch.Tensor:
        out = torch.empty(M, device=dev)
        for r in range(0, M, chunk):
            kl_triton.kl_per_row(teacher[r : r + chunk], F.linear(hidden[r : r + chunk], weight), out=out[r : r + chunk])
        return out

    reference = unfused(2048)
    rows = []
    for name, fn in [("cuBLAS head, 2,048-row chunks, then the KL kernel", lambda: unfused(2048)),
                     (f"cuBLAS head, one {M:,}-row chunk, then the KL kernel", lambda: unfused(M))]:
        ms = milliseconds(fn, 10)
        rows.append(f"| {name} | {ms:.3f} | {flop / ms / 1e9:.0f} | {relative(fn(), reference):.1e} |")
    rows.append(f"| of which the head alone (one chunk) | {milliseconds(lambda: F.linear(hidden, weight), 10):.3f} | | |")
    for config in HEAD_CONFIGS:
        try:
            fn = lambda c=config: kl_triton.head_kl_per_row(hidden, weight, teacher, config=c)  # noqa: E731
            ms = milliseconds(fn, 10)
            rows.append(f"| fused {config} | {ms:.3f} | {flop / ms / 1e9:.0f} | {relative(fn(), reference):.1e} |")
        except Exception as exc:
            rows.append(f"| fused {config} | failed: {type(exc).__name__} | | |")
    section("Output head and KL", "| variant (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) | ms | head TFLOP/s | "
            "difference from cuBLAS + KL |", rows)

    # The KL kernel alone: launch shapes.
    logits = F.linear(hidden[:2048], weight)
    gigabytes = 2 * logits.numel() * 2 / 1e9
    rows = []
    for block_v, warps in KL_LAUNCHES:
        ms = milliseconds(lambda: kl_triton.kl_per_row(teacher[:2048], logits, block_v=block_v, num_warps=warps))
        rows.append(f"| {block_v} | {warps} | {ms:.4f} | {gigabytes / ms:.0f} |")
    section("KL kernel, 2,048 rows", "| block_v | num_warps | ms | GB/s read |", rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
