"""Baselines: the uniform assignment and the dynamic program over per-unit scores.

`uniform` compresses every unit alike. With one level value shared by all units,
"alike" means that level; when no single level meets the budget (levels that do not
divide it, an equality between two levels), it means the closest mix: walk from the
first shared level to the last, moving one unit at a time to the next shared level
in an evenly spread order of units; the mixes on that walk where it enters or leaves
the feasible region are the candidates, with every single level that is feasible.
All candidates are evaluated and the best is returned.

`dp` is the SPDY / EvoPress ``dp_search`` baseline: score every unit at every level
alone (all other units at their first level), then pick the assignment that
minimises the sum of those scores under the budget, exactly, by dynamic programming
over the budget's usage on a grid. That is the right answer when errors add up, and
the baseline that EvoPress beats when they do not.
"""

from __future__ import annotations

from fractions import Fraction
from functools import reduce
from math import gcd, lcm
from typing import TYPE_CHECKING

import numpy as np

from evosearch.errors import EvosearchError
from evosearch.samplers.base import Sampler
from evosearch.space import Budget, Feasibility, Space

if TYPE_CHECKING:
    from evosearch.samplers.base import Context


def uniform_candidates(space: Space, budgets: list[Budget]) -> list[np.ndarray]:
    """Feasible uniform assignments and closest mixes (level indices); see the module docstring."""
    shared = [v for v in space.units[0].levels if all(v in u.levels for u in space.units)]
    if not shared:
        raise EvosearchError("space: no level value is shared by all units, so there is no uniform assignment")
    feasibility = Feasibility(space, budgets)
    levels = [np.array([u.levels.index(v) for u in space.units]) for v in shared]
    # Golden-ratio order spreads the moved units evenly over the space.
    order = np.argsort((np.arange(len(space.units)) * 0.6180339887498949) % 1.0, kind="stable")
    walk = [levels[0]]
    for target in levels[1:]:
        x = walk[-1].copy()
        for unit in order:
            x[unit] = target[unit]
            walk.append(x.copy())
    met = [feasibility.is_met(x) for x in walk]
    candidates = [x for x in levels if feasibility.is_met(x)]
    for i, x in enumerate(walk):
        edge = (i > 0 and not met[i - 1]) or (i + 1 < len(walk) and not met[i + 1])
        if met[i] and edge and not any(np.array_equal(x, c) for c in candidates):
            candidates.append(x)
    if candidates:
        return candidates
    closest = min(walk, key=lambda x: float(feasibility.violation(feasibility.usages(x))))
    x = feasibility.repair(closest, np.random.default_rng(0), anchor=None)
    if x is None:
        raise EvosearchError(
            f"no assignment found that meets every budget ({', '.join(map(str, budgets))}); "
            f"loosen a budget or give an equality budget a tolerance"
        )
    return [x]


class Uniform(Sampler):
    """Every unit at the same level (or the closest mix); the best feasible one."""

    def run(self, ctx: Context) -> None:
        candidates = [ctx.space.assignment(x) for x in uniform_candidates(ctx.space, ctx.budgets)]
        fidelity = ctx.fidelities[-1]
        ctx.progress.start(len(candidates))
        for assignment in candidates:
            ctx.evaluator.evaluate([assignment], fidelity)
            ctx.evaluator.complete([assignment], fidelity)
            ctx.progress.advance()


class DP(Sampler):
    """Per-unit scores, then the exact knapsack that minimises their sum under the budget.

    `bins` caps the size of the usage grid: the grid is exact when every unit's usage
    step is a multiple of a common quantum within that many steps (integer resources,
    equal-size units with equally spaced levels); otherwise the usage is rounded to
    `bins` steps and a rounding that breaks the budget is repaired.
    """

    def __init__(self, bins: int = 100_000):
        self.bins = bins

    def run(self, ctx: Context) -> None:
        if len(ctx.budgets) != 1:
            raise EvosearchError(f"sampler 'dp' handles one budget, got {len(ctx.budgets)}")
        space, budget, fidelity = ctx.space, ctx.budgets[0], ctx.fidelities[-1]
        base = np.zeros(len(space.units), dtype=np.int64)
        probes = [base]
        for unit, n in enumerate(space.n_levels):
            for level in range(1, n):
                probes.append(base.copy())
                probes[-1][unit] = level
        probes = [space.assignment(x) for x in probes]
        ctx.progress.start(len(probes) + 1)
        values = ctx.evaluator.evaluate(probes, fidelity, attrs={"probe": True})
        ctx.evaluator.complete(probes, fidelity)
        ctx.progress.advance(len(probes))

        scores = np.full(budget.contributions(space).shape, np.inf)
        scores[:, 0] = 0.0
        i = 1
        for unit, n in enumerate(space.n_levels):
            scores[unit, 1:n] = np.subtract(values[i : i + n - 1], values[0])
            i += n - 1
        lower, upper = budget.bounds()
        x = knapsack(scores, budget.contributions(space), space.n_levels, lower, upper, self.bins)
        if x is None or not ctx.feasibility.is_met(x):
            x = ctx.feasibility.repair(ctx.anchor if x is None else x, ctx.rng(0), ctx.anchor)
        best = space.assignment(x)
        ctx.evaluator.evaluate([best], fidelity)
        ctx.evaluator.complete([best], fidelity)
        ctx.progress.advance()


def knapsack(
    scores: np.ndarray, usage: np.ndarray, n_levels: np.ndarray, lower: float, upper: float, bins: int
) -> np.ndarray | None:
    """Level indices minimising the sum of `scores` with the summed `usage` in [lower, upper].

    Both arrays are units x levels. Returns None when no assignment fits.
    """
    n = len(n_levels)
    valid = np.arange(usage.shape[1])[None, :] < n_levels[:, None]
    base = np.where(valid, usage, np.inf).min(axis=1)
    steps = np.where(valid, usage - base[:, None], 0.0)  # usage above each unit's cheapest level
    lower, upper = lower - base.sum(), upper - base.sum()
    reach = min(upper, steps.max(axis=1).sum())
    if reach < 0:
        return None
    quantum = _quantum(steps[valid], reach, bins) or max(reach, 1e-12) / bins
    cells = np.rint(steps / quantum).astype(np.int64)
    size = int(np.floor(reach / quantum + 1e-6)) + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    choice = np.zeros((n, size), dtype=np.int16)
    for unit in range(n):
        options = np.full((n_levels[unit], size), np.inf)
        for level in range(n_levels[unit]):
            c = cells[unit, level]
            if c < size and np.isfinite(scores[unit, level]):
                options[level, c:] = best[: size - c] + scores[unit, level]
        choice[unit] = options.argmin(axis=0)
        best = options.min(axis=0)
    first = 0 if lower <= 0 else int(np.ceil(lower / quantum - 1e-6))
    if first >= size or not np.isfinite(best[first:]).any():
        return None
    cell = first + int(np.argmin(best[first:]))
    x = np.zeros(n, dtype=np.int64)
    for unit in reversed(range(n)):
        x[unit] = choice[unit, cell]
        cell -= cells[unit, x[unit]]
    return x


def _quantum(steps: np.ndarray, reach: float, bins: int) -> float | None:
    """The largest q with every step a whole multiple of q and reach/q <= bins, if any."""
    fractions = [Fraction(float(s)).limit_denominator(10**6) for s in steps if s > 0]
    if not fractions:
        return max(reach, 1e-12)
    denominator = reduce(lcm, (f.denominator for f in fractions))
    numerator = reduce(gcd, (int(f * denominator) for f in fractions))
    quantum = numerator / denominator
    exact = all(abs(s / quantum - round(s / quantum)) < 1e-6 for s in steps)
    return quantum if exact and reach / quantum <= bins else None
