"""Sub-networks of the packaged model (SmolLM2-135M): uniform width against the searched
allocation, each before and after reformation; and reformation after unstructured pruning
against SparseGPT's own update. Writes its tables into benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/width.py [--device cuda] [--budgets 0.9,0.8,0.7] [--fitness masked]
    PYTHONPATH=. python benchmarks/width.py --part sparsity [--device cuda]

``--part width`` runs ``evosearch search`` (``run_search``) on the width space once per
budget, with the uniform width as its baseline: the same database, teacher, calibration
and held-out text for both, and the same number of parameters kept (EvoPress starts
from the uniform width and its level switches keep the count). ``--fitness reformed``
scores candidates with each width's reformed output projections instead of the bare
masks; the two write separate tables.

``--part sparsity`` prunes every linear layer to the same unstructured sparsity with
magnitude and SparseGPT, each with and without ADMM reformation of the kept weights
(the sparsity space's ``reform`` option), and reports the layer-wise output error,
summed over layers, with the perplexity and KL of the whole model.

The defaults are GPU settings (a few minutes per budget on one H200); a CPU run passes
smaller ones, and the command that made a table is written above it.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from evosearch import assets
from evosearch.compression import CompressionSpace
from evosearch.data import load_corpus
from evosearch.blocks import capture_block_inputs, run_block
from evosearch.database.build import _hessian_hooks
from evosearch.database.hessian import layer_error
from evosearch.database.store import Database
from evosearch.model import load_model
from evosearch.pipeline import SearchSettings, run_search
from evosearch.units import architecture
from results_md import replace_section  # benchmarks/results_md.py (the script folder is on sys.path)



def common_settings(args) -> dict:
    return dict(device=args.device, dtype=args.dtype, sequence_length=args.sequence_length,
                calibration_sequences=args.calibration_sequences, eval_tokens=args.eval_tokens, seed=args.seed)


def width_part(args) -> str:
    model, _ = load_model(None, device="cpu")
    arch = architecture(model)
    rows = []
    for budget in args.budgets:
        space = args.work / f"width-{args.fitness}.yaml"
        spec = CompressionSpace.load("width").model_dump()
        spec["compression"]["fitness"] = args.fitness
        spec["compression"]["reform"] |= {"method": args.reform, "iterations": args.iterations}
        space.write_text(yaml.safe_dump(spec))
        settings = SearchSettings(space=str(space), budget=budget, generations=args.generations,
                                  sampler_options={"offspring": args.offspring}, fidelities=args.fidelities,
                                  baselines=["uniform"], database=str(args.work / f"db-width-{args.fitness}"),
                                  **common_settings(args))
        report = run_search(settings, args.work / f"width-{args.fitness}-{budget}", force=True)
        rows.append((report, CompressionSpace.load(space).materialize(arch, budget)))
        print(f"budget {budget}: uniform {report['baselines']['uniform']['perplexity']:.3f}, searched "
              f"{report['perplexity']['compressed']:.3f}", file=sys.stderr)
    first = rows[0][0]
    lines = [f"Dense perplexity {first['perplexity']['dense']:.3f} on {first['perplexity']['tokens']:,} held-out "
             f"tokens of {first['perplexity']['corpus']}; KL to the dense model on {first['fitness']['tokens']:,} "
             f"calibration tokens (not those of the reformation). Kept: the fractions of the attention and MLP "
             f"parameters, of the KV groups and of the MLP channels that the sub-network keeps (export removes the "
             f"rest).", "",
             "| budget | allocation | params kept | KV groups kept | MLP channels kept | perplexity, masked | "
             "perplexity, reformed | KL, masked | KL, reformed | layer error reformed / masked | search |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for report, problem in rows:
        uniform = report["baselines"]["uniform"]
        for name, result, reform, assignment, search in (
                ("uniform width", uniform, uniform["reformation"], uniform["assignment"], "-"),
                ("searched (EvoPress)", {"kl": report["fitness"]["kl"], "perplexity": report["perplexity"]["compressed"]},
                 report["reformation"], report["assignment"],
                 f"{report['search']['evaluations']} evaluations, {report['search']['seconds']:.0f} s")):
            used = problem.budget.usage(problem.space, assignment)
            attention, mlp = (kept_fraction(problem, assignment, kind) for kind in ("attention", "mlp"))
            lines.append(f"| {report['budget']['value']} | {name} | {used:.4f} | {attention:.3f} | {mlp:.3f} | "
                         f"{reform['perplexity_before']:.3f} | {result['perplexity']:.3f} | {reform['kl_before']:.4f} | "
                         f"{result['kl']:.4f} | {reform['error_after'] / reform['error_before']:.3f} | {search} |")
    reform = first["reformation"]
    how = (f"ADMM, rho {reform['rho']}, {reform['iterations']} iterations" if reform["method"] == "admm"
           else "closed form (the least-squares optimum that ADMM converges to)")
    lines += ["", f"Search: EvoPress from the best of {len(rows[0][1].starts)} uniform attention/MLP splits, "
                  f"{args.offspring} offspring, {args.generations} generations, fidelities {args.fidelities} tokens, "
                  f"{args.fitness} fitness. Reformation: {how}, damp {reform['damp']}, block by block on "
                  f"{args.calibration_sequences} x {args.sequence_length} calibration tokens."]
    return "\n".join(lines)


def kept_fraction(problem, assignment: dict, kind: str) -> float:
    """The fraction of a kind's KV groups or channels that an assignment keeps, from its level keys."""
    kept = total = 0
    for name, mu in problem.model_units.items():
        if mu.kind == kind:
            full = mu.width["kv_heads"] if kind == "attention" else mu.width["channels"]
            key = problem.key(name, assignment[name])
            kept += full if key == "dense" else 0 if key == "drop" else int(key.split("=")[1])
            total += full
    return kept / total


SPARSITY_VARIANTS = {
    "magnitude": {"method": "magnitude"},
    "magnitude + ADMM reformation": {"method": "magnitude", "reform": True},
    "SparseGPT": {"method": "sparsegpt"},
    "SparseGPT + ADMM reformation": {"method": "sparsegpt", "reform": True},
}


def sparsity_part(args) -> str:
    reports, databases = {}, {}
    for name, compression in SPARSITY_VARIANTS.items():
        space = args.work / f"sparsity-{len(reports)}.yaml"
        compression = dict(compression, kind="sparsity", levels=[args.sparsity])
        if compression.pop("reform", False):
            compression["reform"] = {"method": "admm", "iterations": args.iterations}
        space.write_text(yaml.safe_dump({"name": name, "compression": compression,
                                         "budget": {"resource": "sparsity", "form": "average"}}))
        databases[name] = args.work / f"db-sparsity-{len(reports)}"
        settings = SearchSettings(space=str(space), budget=args.sparsity, sampler="uniform", baselines=[],
                                  database=str(databases[name]), fidelities=[args.fidelities[-1]],
                                  **common_settings(args))
        reports[name] = run_search(settings, args.work / f"sparsity-{len(reports)}", force=True)
    errors = layer_errors(args, databases)
    lines = ["| pruning | summed layer error | perplexity | KL |", "|---|---|---|---|"]
    for name, report in reports.items():
        lines.append(f"| {name} | {errors[name]:.4g} | {report['perplexity']['compressed']:.3f} | "
                     f"{report['fitness']['kl']:.4f} |")
    dense = next(iter(reports.values()))["perplexity"]
    lines += ["", f"Every linear layer at {args.sparsity:.0%} unstructured sparsity (the database's level, built "
                  f"from dense inputs); dense perplexity {dense['dense']:.3f} on {dense['tokens']:,} held-out tokens. "
                  f"Layer error: tr((W - W_hat) H (W - W_hat)^T) per layer, H from the "
                  f"{args.calibration_sequences} x {args.sequence_length} calibration tokens (dense inputs, as the "
                  f"database's), summed over all linear layers. Reformation: ADMM, rho 0.3, {args.iterations} iterations, "
                  f"damp 0.01, started from the pruned weights and kept on their support."]
    return "\n".join(lines)


@torch.no_grad()
def layer_errors(args, databases: dict[str, Path]) -> dict[str, float]:
    """Summed layer error of each database's entries, on the Hessians the databases were built from."""
    model, tokenizer = load_model(None, device=args.device, dtype=args.dtype)
    arch = architecture(model)
    corpus = load_corpus(None, tokenizer)
    sequences = corpus.calibration_sequences(args.calibration_sequences, args.sequence_length, seed=args.seed)
    opened = {name: Database(root) for name, root in databases.items()}
    totals = dict.fromkeys(databases, 0.0)
    inputs = capture_block_inputs(model, arch, sequences, batch_size=8)
    for b, block in enumerate(arch.blocks):
        hooks = _hessian_hooks(arch, b)
        handles = [arch.module(n).register_forward_hook(h) for n, h in hooks["hooks"].items()]
        outputs = [run_block(block, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
        for handle in handles:
            handle.remove()
        for name in arch.linears(b):
            W = arch.module(name).weight
            for variant, database in opened.items():
                entry = database.get(name, f"zeros={round(args.sparsity * W.numel())}", device=W.device)
                totals[variant] += layer_error(W, entry[f"{name}.weight"], hooks["per_linear"][name].H)
        inputs.hidden = outputs
    return totals


def write_section(tag: str, title: str, body: str, started: float) -> None:
    cpu = platform.processor() or next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                        if line.startswith("model name")), "unknown CPU")
    if torch.cuda.is_available() and "cuda" in " ".join(sys.argv):
        cpu = torch.cuda.get_device_name()
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    command = "PYTHONPATH=. python benchmarks/width.py " + " ".join(sys.argv[1:])
    section = "\n".join([f"<!-- {tag}:begin -->", f"## {title}", "",
                         f"Run `{command.strip()}` on {date}; {cpu}, {os.cpu_count()} cores; "
                         f"{time.perf_counter() - started:.0f} s in all.", "", body, f"<!-- {tag}:end -->"])
    replace_section(tag, section)
    print(section)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["width", "sparsity"], default="width")
    parser.add_argument("--budgets", type=lambda s: [float(v) for v in s.split(",")], default=[0.9, 0.8, 0.7],
                        help="fractions of the attention and MLP parameters kept")
    parser.add_argument("--fitness", choices=["masked", "reformed"], default="masked")
    parser.add_argument("--reform", choices=["admm", "closed_form"], default="admm",
                        help="reformation of the chosen sub-networks (closed_form: the exact optimum ADMM approaches)")
    parser.add_argument("--iterations", type=int, default=30, help="ADMM iterations")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="fp32", help="fp32 keeps the reformation's least squares exact")
    parser.add_argument("--generations", type=int, default=200)
    parser.add_argument("--offspring", type=int, default=32)
    parser.add_argument("--fidelities", type=lambda s: [int(v) for v in s.split(",")], default=[2048, 8192, 32768])
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--calibration-sequences", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=assets.cache_dir() / "benchmarks" / "width",
                        help="databases and runs (default: in the cache)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.part == "width":
        write_section(f"width-{args.fitness}", f"Sub-networks of SmolLM2-135M: uniform width vs searched "
                      f"({args.fitness} fitness during the search)", width_part(args), started)
    else:
        write_section("reform-sparsity", f"Reformation after unstructured pruning of SmolLM2-135M ({args.sparsity:.0%})",
                      sparsity_part(args), started)


if __name__ == "__main__":
    main()
