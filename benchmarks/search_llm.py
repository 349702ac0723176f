"""Searched vs heuristic compression of the packaged model (the issue's "Must show" rows).

Runs the main job (``evosearch.pipeline.run_search``) for unstructured sparsity at 50%, 60%
and 70% (SparseGPT database; EvoPress beside the uniform and OWL allocations of the same
database) and for 25% of attention/MLP blocks dropped (EvoPress beside ShortGPT's block
influence), and writes one markdown table: perplexity on held-out Brown text and KL to the
dense model on the calibration tokens.

    python benchmarks/search_llm.py --device cuda --out search.md            # the H200 settings
    python benchmarks/search_llm.py --device cpu --tiny --out /tmp/s.md      # a smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evosearch.pipeline import SearchSettings, run_search  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a few generations on few tokens: a smoke test")
    parser.add_argument("--generations", type=int, default=150)
    parser.add_argument("--offspring", type=int, default=32)
    parser.add_argument("--targets", default="0.5,0.6,0.7")
    parser.add_argument("--drop", type=float, default=0.25)
    parser.add_argument("--runs", default="runs/bench", help="folder for the result folders")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    if args.tiny:
        common = dict(generations=2, sampler_options={"offspring": 4}, sequence_length=128, calibration_sequences=4,
                      fidelities=[128, 256], eval_tokens=1024)
    else:
        common = dict(generations=args.generations, sampler_options={"offspring": args.offspring},
                      sequence_length=2048, calibration_sequences=64, fidelities=[4096, 16384, 65536],
                      eval_tokens=65536)
    common |= dict(device=args.device, dtype="bf16" if args.device.startswith("cuda") else None)

    runs = [("drop", args.drop, ["shortgpt"])] if args.drop else []  # first: the cheapest run
    runs += [("sparsity", float(t), ["uniform", "owl"]) for t in args.targets.split(",") if t]
    rows = []
    for space, budget, baselines in runs:
        start = time.perf_counter()
        settings = SearchSettings(space=space, budget=budget, baselines=baselines, **common)
        report = run_search(settings, Path(args.runs) / f"{space}-{budget:g}", force=True, progress=False)
        seconds = time.perf_counter() - start
        ppl = report["perplexity"]
        for name, result in report["baselines"].items():
            rows.append((space, budget, name, result["perplexity"], result["kl"], None))
        rows.append((space, budget, "evopress", ppl["compressed"], report["fitness"]["kl"],
                     f"{report['search']['evaluations']} evaluations, {report['search']['seconds']:.0f} s search, "
                     f"{seconds:.0f} s in all"))
        print(f"{space} {budget}: done in {seconds:.0f} s", file=sys.stderr)

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    header = (f"Packaged SmolLM2-135M, {name}, {date.today()}; perplexity on {common['eval_tokens']:,} held-out "
              f"Brown tokens (dense {ppl['dense']:.2f}), KL on {common['fidelities'][-1]:,} calibration tokens; "
              f"EvoPress {common['generations']} generations x {common['sampler_options']['offspring']} offspring, "
              f"fidelities {common['fidelities']}.\n"
              f"Command: `python benchmarks/search_llm.py --device {args.device}"
              f"{' --tiny' if args.tiny else ''}`\n")
    lines = ["| space | budget | method | perplexity | KL | search |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {s} | {b:g} | {m} | {p:.2f} | {k:.4f} | {note or ''} |" for s, b, m, p, k, note in rows]
    table = header + "\n" + "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
