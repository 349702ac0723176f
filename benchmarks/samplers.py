"""Compare every sampler on the synthetic problems of `evosearch.testing`.

For each problem, sampler and seed: the number of fitness evaluations until an
evaluated assignment that meets the budget is within 1% of the known optimum, and
whether the optimum itself was reached within the evaluation cap. Writes the table
into the "samplers" section of benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/samplers.py [--seeds 5] [--cap 2000] [--jobs 2]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

import torch

from evosearch import search
from evosearch.testing import evopress_shaped, interacting_drop, knapsack, linear_drop
from results_md import replace_section  # benchmarks/results_md.py (the script folder is on sys.path)

PROBLEMS = {
    "knapsack (40 units x 8 levels, max_total)": lambda seed: knapsack(40, 8, seed=seed),
    "evopress-shaped (40 equal units x 8 levels, average ==)": lambda seed: evopress_shaped({"blocks": (40, 1)}, n_levels=8, seed=seed),
    "linear drop (32 blocks, drop 8)": lambda seed: linear_drop(32, 8, seed=seed),
    "interacting drop (16 blocks, drop 6)": lambda seed: interacting_drop(16, 6, seed=seed),
}
SAMPLERS = ["evopress", "tpe", "nsga2", "cmaes", "gp", "random", "uniform", "dp"]
OPTIONS = {"evopress": {"offspring": 16, "generations": 10**6}}  # the cap stops it
# Model-based samplers cost more per trial as trials accumulate (TPE ~0.1 s, GP seconds
# at this size on a CPU), so they get lower caps to keep the run under half an hour.
CAPS = {"tpe": 1000, "gp": 50}


class Tracker:
    """Counts fitness calls; notes the first call within 1% of the optimum, and at it."""

    def __init__(self, problem):
        self.problem, self.calls = problem, 0
        self.within, self.reached = math.inf, math.inf

    def __call__(self, assignment):
        self.calls += 1
        value = self.problem.fitness(assignment)
        if self.problem.budget.is_met(self.problem.space, assignment):
            gap = value - self.problem.optimum
            if gap <= 0.01 * abs(self.problem.optimum) + 1e-9:
                self.within = min(self.within, self.calls)
            if gap <= 1e-9:
                self.reached = min(self.reached, self.calls)
        return value


def run(job):
    torch.set_num_threads(1)  # GP's tensors; the jobs already run in parallel
    problem_name, sampler, seed, cap = job
    problem = PROBLEMS[problem_name](seed)
    tracker = Tracker(problem)
    cap = min(cap, CAPS.get(sampler, cap))
    started = time.perf_counter()
    result = search(
        problem.space, tracker, problem.budget, sampler=sampler, seed=seed, n_trials=cap,
        sampler_options=OPTIONS.get(sampler), progress=False,
    )
    gap = (result.best.value - problem.optimum) / abs(problem.optimum)
    return problem_name, sampler, seed, tracker.within, tracker.reached, tracker.calls, gap, time.perf_counter() - started


def table(rows, seeds: int, cap: int) -> str:
    lines = []
    for problem_name in PROBLEMS:
        lines += [
            f"**{problem_name}**", "",
            "| sampler | evaluations to within 1% (median) | optimum reached | final gap (median) | evaluations spent (median) | seconds (median) |",
            "|---|---|---|---|---|---|",
        ]
        for sampler in SAMPLERS:
            runs = [r for r in rows if r[0] == problem_name and r[1] == sampler]
            within = statistics.median(r[3] for r in runs)
            limit = min(cap, CAPS.get(sampler, cap))
            within_text = f"{within:.0f}" if math.isfinite(within) else f"> {limit} (not reached)"
            reached = sum(math.isfinite(r[4]) for r in runs)
            lines.append(
                f"| {sampler} | {within_text} | {reached}/{len(runs)} | {100 * statistics.median(r[6] for r in runs):.2f}% "
                f"| {statistics.median(r[5] for r in runs):.0f} | {statistics.median(r[7] for r in runs):.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cap", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    jobs = [(p, s, seed, args.cap) for p in PROBLEMS for s in SAMPLERS for seed in range(args.seeds)]
    jobs.sort(key=lambda j: j[1] not in CAPS)  # the slowest first
    started = time.perf_counter()
    rows = []
    with multiprocessing.Pool(args.jobs) as pool:
        for row in pool.imap_unordered(run, jobs):
            rows.append(row)
            print(f"[{len(rows)}/{len(jobs)}] {row[1]:8s} seed {row[2]} {row[0]}: within 1% at {row[3]}, {row[7]:.1f} s", file=sys.stderr)
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    command = "PYTHONPATH=. python benchmarks/samplers.py " + " ".join(sys.argv[1:])
    section = "\n".join([
        "<!-- samplers:begin -->",
        "## Samplers on synthetic problems",
        "",
        f"Run `{command.strip()}` on {date}; {cpu}, {os.cpu_count()} cores, {args.jobs} jobs in parallel; "
        f"{time.perf_counter() - started:.0f} s in all.",
        "",
        f"Medians over {args.seeds} seeds (problem instance and sampler seed both vary). An evaluation is one fitness call; "
        f"the cap is {args.cap} evaluations ("
        + ", ".join(f"{c} for {s}" for s, c in CAPS.items() if c < args.cap)
        + ": their trials cost more here). "
        "EvoPress runs with 16 offspring and one selection stage (the fitness has one fidelity) until the cap. "
        "'optimum reached' counts the seeds whose search evaluated the exact optimum. "
        "The optima come from an integer dynamic program or brute force (`evosearch/testing.py`).",
        "",
        table(rows, args.seeds, args.cap),
        "<!-- samplers:end -->",
    ])
    replace_section("samplers", section)
    print(section)


if __name__ == "__main__":
    main()
