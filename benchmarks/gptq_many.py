"""GPTQ database build: every bit-width of a layer in one sweep vs one sweep per bit-width.

Times ``GPTQ.quantize`` once per format against ``GPTQ.quantize_many`` on all formats
(bits 2..6, groups of 128, asymmetric: the quant space's), on SmolLM2-135M's linear
shapes, with a random weight and Hessian, and checks that both give the same codes,
scales and zeros. ``--against REV`` also times ``quantize`` per format as it was at a git
revision (the build's cost before). Each variant's time is its best of ``--repeats``,
run in turn, so that a busy machine slows all alike.

    PYTHONPATH=. python benchmarks/gptq_many.py --against 61c69fd          # CPU, 1 thread
    PYTHONPATH=. python benchmarks/gptq_many.py --device cuda --against 61c69fd
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evosearch.database.quantization import GPTQ, QuantFormat  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536)]  # q/o, gate/up, down


def module_at(rev: str) -> types.ModuleType:
    """evosearch/database/quantization.py as it was at ``rev``."""
    source = subprocess.check_output(["git", "show", f"{rev}:evosearch/database/quantization.py"], cwd=ROOT, text=True)
    module = sys.modules[f"quantization_{rev}"] = types.ModuleType(f"quantization_{rev}")  # dataclasses look it up
    exec(compile(source, f"{rev}:quantization.py", "exec"), module.__dict__)
    return module


def seconds(run, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: on a shared CPU, no OpenMP threads waiting on each other)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--against", metavar="REV", help="also time quantize per format at this git revision")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old = module_at(args.against) if args.against else None
    fmts = [QuantFormat(bits, 128) for bits in (2, 3, 4, 5, 6)]
    totals = {"per format": 0.0, "one sweep": 0.0} | ({f"per format at {args.against}": 0.0} if old else {})
    gen = torch.Generator().manual_seed(0)
    for rows, cols in SHAPES:
        X = torch.randn(4 * cols, cols, generator=gen)
        W, H = (0.05 * torch.randn(rows, cols, generator=gen)).to(args.device), (X.T @ X / len(X)).to(args.device)
        gptq = GPTQ(W, H)
        many = gptq.quantize_many(fmts)
        for fmt, q in zip(fmts, many):
            one = gptq.quantize(fmt)
            assert all(torch.equal(getattr(q, n), getattr(one, n)) for n in ("codes", "scales", "zeros")), fmt
        runs = {"per format": lambda: [gptq.quantize(fmt) for fmt in fmts],
                "one sweep": lambda: gptq.quantize_many(fmts)}
        if old:
            old_gptq = old.GPTQ(W, H)
            old_fmts = [old.QuantFormat(f.bits, f.group_size, f.symmetric) for f in fmts]
            runs[f"per format at {args.against}"] = lambda: [old_gptq.quantize(fmt) for fmt in old_fmts]
        times = {name: float("inf") for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name] = min(times[name], seconds(run, args.device))
        for name, best in times.items():
            totals[name] += best
        print(f"{rows}x{cols}: " + ", ".join(f"{name} {s:.3f} s" for name, s in times.items()), flush=True)
    print("total: " + ", ".join(f"{name} {s:.3f} s" for name, s in totals.items()))
    for name, total in totals.items():
        if name != "one sweep":
            print(f"speed-up of one sweep over {name}: {total / totals['one sweep']:.2f}x")
    print(f"device {args.device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")


if __name__ == "__main__":
    main()
