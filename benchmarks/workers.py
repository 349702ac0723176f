"""Wall-clock speed-up of one search on 1, 2 and 4 workers sharing a machine (journal-file storage).

Real (default, for a GPU machine): an EvoPress search of the packaged model (SmolLM2-135M,
`sparsity` space, budget 0.5, fidelities 512 and 2048 tokens) through `run_search`, as
``evosearch search --workers K`` runs it: the same settings and seed for every run, the
workers sharing the GPU. A first, in-process run builds the database (or finds it in
the cache); every run then loads it.

Synthetic (``--synthetic``, anywhere): the evopress-shaped problem of `evosearch.testing`
with a fitness that sleeps ``--delay`` seconds per evaluation, on CPU worker processes.

Each run is timed from the start of the search to its end, the workers' start-up
(loading the model) included; "start-up" is how long the first evaluation waited for a
worker. Writes the table into benchmarks/RESULTS.md and prints it.

    PYTHONPATH=. python benchmarks/workers.py                 # GPU machine, about 5 minutes
    PYTHONPATH=. python benchmarks/workers.py --synthetic     # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import TrialState

from evosearch import search
from evosearch.testing import slow_fitness
from evosearch.workers import Workers, evaluations_study, open_storage
from results_md import replace_section  # benchmarks/results_md.py (the script folder is on sys.path)

SYNTHETIC = {"problem": "evopress_shaped", "args": {"groups": {"blocks": [32, 1]}}, "fidelities": [1, 8]}


def real_run(workers: int, tmp: Path, args) -> dict:
    from evosearch.pipeline import SearchSettings, run_search

    storage = str(tmp / f"{workers}.journal")
    settings = SearchSettings(space="sparsity", budget=0.5, model=args.model, corpus=args.corpus,
                              generations=args.generations,
                              sampler_options={"offspring": args.offspring}, fidelities=[512, 2048],
                              eval_tokens=2048, baselines=[], storage=storage, workers=workers or None)
    report = run_search(settings, tmp / str(workers), progress=False)
    return {"seconds": report["search"]["seconds"], "evaluations": report["search"]["evaluations"],
            "best": report["assignment"], "value": report["fitness"]["search_value"],
            **_from_storage(storage, "evosearch-sparsity", workers)}


def synthetic_run(workers: int, tmp: Path, args) -> dict:
    options = {**SYNTHETIC, "delay": args.delay}
    fitness, storage = slow_fitness(options), str(tmp / f"{workers}.journal")
    problem = fitness.problem
    common = dict(storage=storage, study_name="synthetic", sampler_options={
        "offspring": args.offspring, "generations": args.generations}, progress=False)
    if workers:
        with Workers(storage, "synthetic", count=workers, options=options, fidelities=options["fidelities"],
                     factory="evosearch.testing:slow_fitness") as pool:
            result = search(problem.space, pool, problem.budget, **common)
    else:
        result = search(problem.space, fitness, problem.budget, **common)
    return {"seconds": result.wall_time, "evaluations": result.n_evaluations, "best": result.best.assignment,
            "value": result.best.value, **_from_storage(storage, "synthetic", workers)}


def _from_storage(storage: str, study_name: str, workers: int) -> dict:
    """How long the first evaluation waited for a worker, and how many evaluations each worker did."""
    if not workers:
        return {"startup": 0.0, "per_worker": []}
    store = open_storage(storage)
    first = optuna.load_study(study_name=study_name, storage=store).trials[0].datetime_start
    evaluations = optuna.load_study(study_name=evaluations_study(study_name), storage=store).trials
    claimed = min(t.datetime_start for t in evaluations if t.datetime_start is not None)
    done = Counter(t.user_attrs["worker"] for t in evaluations if t.state == TrialState.COMPLETE)
    return {"startup": (claimed - first).total_seconds(), "per_worker": sorted(done.values(), reverse=True)}


def table(rows: dict[int, dict]) -> str:
    one, alone = rows[min(k for k in rows if k)]["seconds"], rows[0]["seconds"]
    lines = ["| workers | search (s) | start-up (s) | speed-up vs 1 worker | vs in-process | evaluations "
             "| evaluations per worker | same best as in-process |", "|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        lines.append(f"| {k or 'in-process'} | {r['seconds']:.1f} | {r['startup']:.1f} | "
                     f"{one / r['seconds']:.2f}x | {alone / r['seconds']:.2f}x | {r['evaluations']} | "
                     f"{', '.join(map(str, r['per_worker'])) or '-'} | "
                     f"{'yes' if (r['best'], r['value']) == (rows[0]['best'], rows[0]['value']) else 'NO'} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--synthetic", action="store_true", help="a sleeping synthetic fitness on CPU workers")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to time (besides in-process)")
    parser.add_argument("--generations", type=int, default=None, help="default 30 (real), 12 (synthetic)")
    parser.add_argument("--offspring", type=int, default=None, help="default 32 (real), 16 (synthetic)")
    parser.add_argument("--delay", type=float, default=0.1, help="synthetic: seconds per evaluation")
    parser.add_argument("--model", default=None, help="real: another model than the packaged one (a HF folder)")
    parser.add_argument("--corpus", default=None, help="real: another corpus than Brown")
    args = parser.parse_args()
    args.generations = args.generations or (12 if args.synthetic else 30)
    args.offspring = args.offspring or (16 if args.synthetic else 32)
    run = synthetic_run if args.synthetic else real_run
    started, rows, load = time.perf_counter(), {}, os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for k in [0] + [int(k) for k in args.workers.split(",")]:
            rows[k] = run(k, Path(tmp), args)
            print(f"{k or 'in-process'}: {rows[k]['seconds']:.1f} s, {rows[k]['evaluations']} evaluations",
                  file=sys.stderr)
    name = "workers-synthetic" if args.synthetic else "workers"
    if args.synthetic:
        what = (f"Synthetic: evopress-shaped problem (32 units), EvoPress with {args.offspring} offspring for "
                f"{args.generations} generations, fidelities 1 and 8, a fitness that sleeps {args.delay} s per "
                f"evaluation; CPU worker processes. This measures the coordination through the storage, not a model.")
        machine = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    else:
        import torch

        what = (f"{args.model or 'SmolLM2-135M'}, `sparsity` space at 0.5, EvoPress with {args.offspring} offspring for "
                f"{args.generations} generations, fidelities 512 and 2048 tokens; every worker on the one GPU.")
        machine = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    command = "PYTHONPATH=. python benchmarks/workers.py " + " ".join(sys.argv[1:])
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    section = "\n".join([
        f"<!-- {name}:begin -->",
        f"## Search on several workers{' (synthetic)' if args.synthetic else ''}",
        "",
        f"Run `{command.strip()}` on {date}; {machine}, {os.cpu_count()} CPU cores (load average "
        f"{load:.1f} when it started); journal-file storage; {time.perf_counter() - started:.0f} s in all.",
        "",
        what,
        "",
        table(rows),
        f"<!-- {name}:end -->",
    ])
    replace_section(name, section)
    print(section)


if __name__ == "__main__":
    main()
