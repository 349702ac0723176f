"""What the search's bookkeeping costs per evaluation, by Optuna storage.

Every evaluation of a search is an Optuna trial (created, its level and attributes set,
told), written to the study's storage. With a fast fitness that is no longer free: this
times EvoPress on the synthetic evopress-shaped problem, whose fitness costs microseconds,
with an in-memory study, a SQLite file (what a search folder held before) and a journal
file (what it holds now). Writes its section of benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/storage_overhead.py --evaluations 600
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from evosearch import search
from evosearch.testing import evopress_shaped
from results_md import replace_section  # benchmarks/results_md.py (the script folder is on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--evaluations", type=int, default=600)
    args = parser.parse_args()
    problem = evopress_shaped({"blocks": (32, 1)})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, storage in [("in memory", None), ("SQLite file (`sqlite:///study.db`)", f"sqlite:///{tmp}/study.db"),
                              ("journal file (`study.journal`)", f"{tmp}/study.journal")]:
            start = time.perf_counter()
            result = search(problem.space, problem.fitness, problem.budget, sampler="evopress",
                            n_trials=args.evaluations, storage=storage, study_name="overhead",
                            sampler_options={"offspring": 16}, progress=False)
            seconds = time.perf_counter() - start
            rows.append((name, result.n_evaluations, 1e3 * seconds / result.n_evaluations))
            print(f"{name}: {rows[-1][2]:.1f} ms per evaluation", file=sys.stderr)
    machine = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    table = "\n".join(["| storage | evaluations | ms per evaluation |", "|---|---|---|"] +
                      [f"| {name} | {n} | {ms:.1f} |" for name, n, ms in rows])
    section = "\n".join([
        "<!-- storage-overhead:begin -->",
        "## Search bookkeeping per evaluation, by storage",
        "",
        f"Run `PYTHONPATH=. python benchmarks/storage_overhead.py --evaluations {args.evaluations}` on {date}; "
        f"{machine}, {os.cpu_count()} cores shared with other jobs. EvoPress (16 offspring) on the synthetic "
        "evopress-shaped problem (32 units), whose fitness costs microseconds: the time is the search's own.",
        "",
        table,
        "<!-- storage-overhead:end -->",
    ])
    replace_section("storage-overhead", section)
    print(section)


if __name__ == "__main__":
    main()
