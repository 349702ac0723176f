"""Synthetic problems with a known optimum, for testing and benchmarking samplers.

Each generator returns a `Problem`: a space, a budget, a fitness and the optimum,
found by a method independent of the samplers (an integer dynamic program or
brute force). Resources are integers so that the optimum is exact.

- `knapsack`: additive costs under a total-resource cap (units of random sizes).
- `evopress_shaped`: groups of equal-size units, equally spaced sparsity levels, an
  average-sparsity equality budget, convex additive costs (EvoPress's setting).
- `linear_drop`: drop k of n equal blocks; a linear fitness (the setting of the
  EvoPress convergence theorem).
- `interacting_drop`: drop k of n blocks where dropping neighbours costs extra, so
  the sum of per-block costs misleads (brute-force optimum).

`slow_fitness` rebuilds one of them from JSON options, as a worker process does
(``evosearch worker --fitness evosearch.testing:slow_fitness``), multi-fidelity and with
a fixed time per evaluation.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from evosearch.space import Assignment, Budget, Space, Unit


@dataclass
class Problem:
    space: Space
    budget: Budget
    fitness: Callable[[Assignment], float]
    optimum: float  # the lowest fitness over assignments that meet the budget
    best: Assignment  # an assignment reaching it
    share_optimum: float | None = None  # evopress_shaped: the optimum when each group keeps its uniform share


def _additive(space: Space, costs: list[np.ndarray]) -> Callable[[Assignment], float]:
    def fitness(assignment: Assignment) -> float:
        return float(sum(c[i] for c, i in zip(costs, space.indices(assignment))))

    return fitness


def _exact_knapsack(costs: list[np.ndarray], weights: list[np.ndarray], lower: int, upper: int) -> tuple[float, list[int]]:
    """Minimise sum(costs[u][i_u]) with lower <= sum(weights[u][i_u]) <= upper (integer weights >= 0)."""
    best = np.full(upper + 1, np.inf)  # best[w]: lowest cost of the units so far using weight w
    best[0] = 0.0
    choices = []
    for cost, weight in zip(costs, weights):
        table = np.full((len(cost), upper + 1), np.inf)
        for i, (c, w) in enumerate(zip(cost, weight)):
            table[i, w:] = best[: upper + 1 - w] + c
        choices.append(table.argmin(axis=0))
        best = table.min(axis=0)
    used = lower + int(np.argmin(best[lower:]))
    value, levels = float(best[used]), []
    for choice, weight in zip(reversed(choices), reversed(weights)):
        levels.append(int(choice[used]))
        used -= int(weight[levels[-1]])
    return value, levels[::-1]


def knapsack(n_units: int = 40, n_levels: int = 8, seed: int = 0) -> Problem:
    """Additive costs; each level frees a random integer amount of 'params'; total params capped at 55%."""
    rng = np.random.default_rng(seed)
    units, costs, weights = [], [], []
    for u in range(n_units):
        params = np.sort(rng.integers(1, 40, n_levels))[::-1]
        params[0] = max(params[0], 40)  # the first level is the dense one, the largest
        error = np.sort(rng.exponential(1.0, n_levels)) * rng.uniform(0.2, 2.0)
        error -= error[0]
        units.append(Unit(name=f"layer{u}", levels=[f"l{i}" for i in range(n_levels)], resources={"params": params.tolist()}))
        costs.append(error)
        weights.append(params)
    cap = int(0.55 * sum(w[0] for w in weights))
    space = Space(units=units, name="knapsack")
    value, levels = _exact_knapsack(costs, weights, 0, cap)
    return Problem(space, Budget(resource="params", max_total=cap), _additive(space, costs), value, space.assignment(levels))


def evopress_shaped(
    groups: dict[str, tuple[int, int]] | None = None, n_levels: int = 6, target_level: int = 3, seed: int = 0
) -> Problem:
    """`groups` maps a group name to (number of units, unit size); levels are sparsities 0, 0.1, ...

    The budget is average sparsity == level `target_level`. Costs are convex in the
    level, scaled by the unit's size.
    """
    groups = groups or {"blocks": (32, 1)}
    rng = np.random.default_rng(seed)
    sparsities = [round(0.1 * i, 1) for i in range(n_levels)]
    units, costs, weights = [], [], []
    for group, (count, size) in groups.items():
        for u in range(count):
            a, b = rng.uniform(0.05, 1.0, 2)
            i = np.arange(n_levels)
            costs.append(size * (a * i**2 + b * i))
            weights.append(size * i)
            units.append(
                Unit(name=f"{group}{u}", levels=sparsities, resources={"sparsity": sparsities}, size=size, group=group)
            )
    space = Space(units=units, name="evopress-shaped")
    target = sum(size * count for count, size in groups.values()) * target_level
    value, levels = _exact_knapsack(costs, weights, target, target)
    # Level switches stay inside a group, so from the uniform start each group keeps
    # its share of the budget; with one group this is the optimum itself.
    share_optimum, start = 0.0, 0
    for count, size in groups.values():
        group = slice(start, start + count)
        share = count * size * target_level
        share_optimum += _exact_knapsack(costs[group], weights[group], share, share)[0]
        start += count
    budget = Budget(resource="sparsity", average=sparsities[target_level])
    return Problem(space, budget, _additive(space, costs), value, space.assignment(levels), share_optimum)


def linear_drop(n: int = 32, k: int = 8, seed: int = 0) -> Problem:
    """Drop exactly k of n equal blocks; dropping block u costs w_u, distinct integers in 1..1000."""
    rng = np.random.default_rng(seed)
    w = rng.choice(np.arange(1, 1001), n, replace=False).astype(float)
    space = Space(
        units=[Unit(name=f"block{u}", levels=["keep", "drop"], resources={"dropped": [0, 1]}) for u in range(n)],
        name="linear-drop",
    )
    costs = [np.array([0.0, wu]) for wu in w]
    best = np.zeros(n, dtype=int)
    best[np.argsort(w)[:k]] = 1
    return Problem(space, Budget(resource="dropped", total=k), _additive(space, costs), float(np.sort(w)[:k].sum()), space.assignment(best))


def interacting_drop(n: int = 16, k: int = 6, penalty: float = 4.0, seed: int = 0) -> Problem:
    """Drop k of n blocks; dropping two neighbouring blocks costs `penalty` extra.

    The cheapest blocks to drop alone sit next to each other, so summing per-block
    costs (what a dynamic program over per-unit scores does) drops neighbours.
    """
    rng = np.random.default_rng(seed)
    w = rng.uniform(2.0, 6.0, n)
    cheap = n // 2 - k // 2
    w[cheap : cheap + k] = rng.uniform(0.1, 1.0, k)
    space = Space(
        units=[Unit(name=f"block{u}", levels=["keep", "drop"], resources={"dropped": [0, 1]}) for u in range(n)],
        name="interacting-drop",
    )

    def cost(x: np.ndarray) -> float:
        return float(w @ x + penalty * (x[1:] * x[:-1]).sum())

    def fitness(assignment: Assignment) -> float:
        return cost(space.indices(assignment))

    best, value = None, np.inf
    for dropped in itertools.combinations(range(n), k):
        x = np.zeros(n, dtype=int)
        x[list(dropped)] = 1
        if cost(x) < value:
            best, value = x, cost(x)
    return Problem(space, Budget(resource="dropped", total=k), fitness, value, space.assignment(best))


PROBLEMS = {"knapsack": knapsack, "evopress_shaped": evopress_shaped, "linear_drop": linear_drop,
            "interacting_drop": interacting_drop}


class SlowFitness:
    """A problem's fitness (an ``engine.Fitness``) that takes `delay` seconds per call; with `fidelities`,
    scored at a fidelity f it is off by a deterministic relative error below 1/f (the same in every process)."""

    def __init__(self, problem: Problem, fidelities: list[int] | None, delay: float):
        self.problem, self.delay = problem, delay
        self.fidelities = list(fidelities) if fidelities else None

    def evaluate_batch(self, assignments: list[Assignment], fidelity: int | None) -> list[float]:
        return [self(a, fidelity) for a in assignments]

    def __call__(self, assignment: Assignment, fidelity: int | None = None) -> float:
        time.sleep(self.delay)
        value = self.problem.fitness(assignment)
        if fidelity is None:
            return value
        digest = int(hashlib.sha256(json.dumps(assignment, sort_keys=True).encode()).hexdigest()[:8], 16)
        return value * (1 + digest % 97 / (97 * fidelity))


def slow_fitness(options: dict, device: str | None = None) -> SlowFitness:
    """A worker's fitness: options ``{"problem": "evopress_shaped", "args": {...},
    "fidelities": [1, 8], "delay": 0.05}`` (`device` is unused)."""
    problem = PROBLEMS[options["problem"]](**options.get("args", {}))
    return SlowFitness(problem, options.get("fidelities"), options.get("delay", 0.0))


def result_of(settings, levels: dict, assignment: dict | None = None):
    """A ``RunResult`` for a search that was not run: its settings, its space and the chosen level of each
    unit, every measurement empty (for tests of what reads results: heal, export, show)."""
    from evosearch.compression import CompressionSpace
    from evosearch.run import BudgetRecord, RunResult, SearchRecord

    spec = CompressionSpace.load(settings.space)
    return RunResult(settings=settings, space={"units": len(levels)} | spec.model_dump(mode="json"),
                     budget=BudgetRecord(resource=spec.budget.resource, label=spec.budget.resource,
                                         value=settings.budget, planned=settings.budget),
                     assignment=assignment or {unit: level.name for unit, level in levels.items()}, levels=levels,
                     fitness={}, perplexity={}, parameters={"dense": 0, "kept": 0},
                     search=SearchRecord(sampler=settings.sampler, evaluations=0, seconds=0.0, best_trial=0,
                                         study="none"))
