"""Uniform GPTQ vs EvoPress-searched bit-widths on the packaged model, at several budgets.

For every budget, one ``run_search`` with the space's uniform baseline beside the
search: both use the same database (GPTQ, built once for all budgets), the same KL
fitness and the same held-out text. "Uniform" is the engine's uniform sampler: every
layer at one bit-width when the budget is a whole number; otherwise the closest mix
of the two neighbouring bit-widths under the budget (layers moved from the lower to
the higher one in an evenly spread order until the next would break it); the best of
its candidates by KL is reported. Appends one run (command, hardware, date, settings
and a row per budget) to the "quant" section of benchmarks/RESULTS.md.

The defaults are the GPU settings:

    PYTHONPATH=. python benchmarks/quant.py --device cuda

``--space sparsity-quant --budgets 0.25`` runs the joint sparsity x bit-width space
the same way (budget: a fraction of the float16 bytes).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from evosearch.compression import CompressionSpace
from evosearch.pipeline import SearchSettings, run_search

RESULTS = Path(__file__).parent / "RESULTS.md"


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"CPU: {cpu}, {os.cpu_count()} cores shared with other jobs (torch {torch.__version__})"


def allocation(assignment: dict) -> str:
    """How the layers were spread over the levels, in a few words."""
    counts = Counter(assignment.values())
    return ", ".join(f"{n} x {level}{'' if isinstance(level, str) else ' bit'}" for level, n in
                     sorted(counts.items(), key=lambda kv: str(kv[0])))


def row(budget: float, report: dict) -> str:
    uniform = report["baselines"]["uniform"]
    q = report["quantization"]
    ppl = report["perplexity"]
    return (f"| {budget:g} | {ppl['dense']:.3f} "
            f"| {uniform['perplexity']:.3f} | {uniform['kl']:.4f} | {uniform['usage']:.4f} "
            f"| **{ppl['compressed']:.3f}** | {report['fitness']['kl']:.4f} | {report['budget']['measured']:.4f} "
            f"| {q['bits']:.3f} | {q['fp16_fraction']:.4f} | {report['search']['evaluations']} "
            f"| {report['search']['seconds']:.0f} | {allocation(report['assignment'])} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="quant")
    parser.add_argument("--model", default=None, help="default: the packaged SmolLM2-135M")
    parser.add_argument("--budgets", default="3,3.5,4")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--offspring", type=int, default=32)
    parser.add_argument("--fidelities", default="2048,8192,32768")
    parser.add_argument("--sequence-length", type=int, default=2048)
    parser.add_argument("--calibration-sequences", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--corpus", default="brown")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmark-quant", help="folder for each budget's search and the database")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[evosearch] %(message)s")

    spec = CompressionSpace.load(args.space)
    out = Path(args.out)
    rows, started = [], time.perf_counter()
    for budget in (float(b) for b in args.budgets.split(",")):
        settings = SearchSettings(
            space=args.space, budget=budget, model=args.model, sampler="evopress", sampler_options={"offspring": args.offspring},
            generations=args.generations, seed=args.seed, corpus=args.corpus, sequence_length=args.sequence_length,
            calibration_sequences=args.calibration_sequences,
            fidelities=[int(f) for f in args.fidelities.split(",")], eval_tokens=args.eval_tokens,
            device=args.device, dtype=args.dtype, database=str(out / "database"), baselines=["uniform"])
        report = run_search(settings, out / f"budget-{budget:g}", force=True, progress=True)
        rows.append(row(budget, report))
        print(rows[-1], file=sys.stderr)
        print(f"database {report['timings']['database']:.0f} s, search {report['timings']['search']:.0f} s",
              file=sys.stderr)

    comp = spec.compression
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = f"{threads}PYTHONPATH=. python benchmarks/quant.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    label = report["budget"]["label"]
    run = "\n".join([
        f"### `{command.strip()}`",
        "",
        f"{date}; {hardware(args.device)}; {time.perf_counter() - started:.0f} s in all. Space `{args.space}`: "
        f"{comp.method.upper()} {', '.join(map(str, sorted(comp.bits)))} bits, groups of {comp.group_size}, "
        f"{'symmetric' if comp.symmetric else 'asymmetric'}{', act_order' if comp.act_order else ''}"
        + (f", {comp.pruning} at sparsities {', '.join(f'{s:g}' for s in comp.sparsity)}"
           if hasattr(comp, "pruning") else "")
        + f"; calibration {args.calibration_sequences} x {args.sequence_length} tokens of {args.corpus}; "
        f"EvoPress {args.generations} generations of {args.offspring} offspring, fidelities {args.fidelities} "
        f"tokens; perplexity on {report['perplexity']['tokens']:,} held-out tokens of {report['perplexity']['corpus']} "
        f"(1,024-token windows).",
        "",
        f"| budget ({label}) | dense ppl | uniform ppl | uniform KL | uniform {label} | EvoPress ppl | EvoPress KL "
        f"| EvoPress {label} (counted) | average bits | fraction of fp16 bytes | evaluations | search s "
        f"| EvoPress allocation |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    header = "\n".join([
        "<!-- quant:begin -->",
        "## Bit-widths: uniform GPTQ vs EvoPress",
        "",
        "Written by `benchmarks/quant.py`; one run per heading, newest last. Uniform: every layer at one bit-width "
        "for a whole-number budget, otherwise the closest mix of the two neighbouring bit-widths under the budget "
        "(the engine's `uniform` sampler, best of its candidates by KL). KL is to the dense model on the fitness' "
        "calibration tokens; average bits are counted from the applied formats, checked against the weights (every "
        "group holds at most 2^bits distinct values), scales and zero points apart; the fraction of fp16 bytes "
        "includes them. The packaged weights are a dequantised GGUF Q4_1 grid (asymmetric, groups of 32): groups "
        "of 128 do not line up with it.",
        "",
        "<!-- quant:end -->",
    ])
    if "<!-- quant:begin -->" not in text:
        text = text.rstrip("\n") + "\n\n" + header + "\n"
    text = re.sub(r"\n<!-- quant:end -->", lambda _: "\n" + run + "\n\n<!-- quant:end -->", text, count=1)
    RESULTS.write_text(text)
    print(run)


if __name__ == "__main__":
    main()
