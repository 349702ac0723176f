"""Heuristic baselines that allocate compression from per-unit scores of the dense model.

- ``owl``: Outlier-Weighted Layerwise sparsity (Yin et al., 2023). A block with more
  outlier weights (Wanda score above M = 5 times its layer's mean) keeps more weights:
  block sparsities spread over ``[target - lambda, target + lambda]`` (lambda = 0.08)
  in order of their outlier ratios, averaging the target.
- ``shortgpt``: ShortGPT's block influence (Men et al., 2024): drop the units whose
  residual stream changes least (lowest 1 - cos(input, output)) until the budget is met.

Both need statistics gathered while the database is built, so they are registered for
one problem at a time (``register_for``). Each evaluates its single assignment once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from evosearch.errors import EvosearchError
from evosearch.samplers import Sampler, register
from evosearch.space import Feasibility

if TYPE_CHECKING:
    from evosearch.compression import SearchProblem
    from evosearch.database.store import Database
    from evosearch.engine import Context

OWL_LAMBDA = 0.08


class FixedAssignment(Sampler):
    """Evaluates one precomputed assignment (level indices) at the full fidelity."""

    def __init__(self, name: str, compute):
        self.name = name
        self.compute = compute

    def run(self, ctx: Context) -> None:
        assignment = ctx.space.assignment(self.compute(ctx))
        fidelity = ctx.fidelities[-1]
        ctx.bar.reset(total=1)
        ctx.evaluator.evaluate([assignment], fidelity, attrs={"heuristic": self.name})
        ctx.evaluator.complete([assignment], fidelity)
        ctx.bar.update()


def owl_sparsities(outlier_ratio: np.ndarray, target: float, lam: float = OWL_LAMBDA) -> np.ndarray:
    """OWL's per-block sparsities: outlier ratios rescaled to [0, 2 lambda], centred on the target."""
    span = outlier_ratio.max() - outlier_ratio.min()
    scaled = (outlier_ratio - outlier_ratio.min()) / span * 2 * lam if span > 0 else np.zeros_like(outlier_ratio)
    density = scaled - scaled.mean() + (1 - target)
    return 1 - density


def closest_feasible(ctx: Context, desired: np.ndarray, resource: str) -> np.ndarray:
    """The levels whose ``resource`` is nearest ``desired`` per unit, then single-level moves
    that cost least (in distance from ``desired``) among those that bring the budgets closer."""
    table = ctx.space.resource_table(resource)
    valid = np.arange(table.shape[1])[None, :] < ctx.space.n_levels[:, None]
    distance = np.where(valid, np.abs(table - desired[:, None]), np.inf)
    x = distance.argmin(axis=1)
    feasibility: Feasibility = ctx.feasibility
    while not feasibility.is_met(x):
        current = float(feasibility.violation(feasibility.usages(x)))
        best, best_cost = None, np.inf
        for step in (-1, 1):
            moved = np.clip(x + step, 0, ctx.space.n_levels - 1)
            for unit in np.flatnonzero(moved != x):
                y = x.copy()
                y[unit] = moved[unit]
                if float(feasibility.violation(feasibility.usages(y))) < current - 1e-12:
                    cost = distance[unit, y[unit]] - distance[unit, x[unit]]
                    if cost < best_cost:
                        best, best_cost = y, cost
        if best is None:
            raise EvosearchError("no single-level move brings this assignment within budget")
        x = best
    return x


def register_for(problem: SearchProblem, database: Database) -> None:
    """Register ``owl`` and ``shortgpt`` for this problem, using the database's statistics."""
    stats = database.stats
    kind = problem.spec.compression.kind

    def owl(ctx: Context) -> np.ndarray:
        if kind != "sparsity":
            raise EvosearchError("sampler 'owl' allocates sparsity; use it with a sparsity space")
        blocks = sorted({mu.block for mu in problem.model_units.values()})
        ratios = np.array([stats[problem.arch.block_name(b)]["outlier_ratio"] for b in blocks])
        per_block = dict(zip(blocks, owl_sparsities(ratios, problem.budget.target)))
        desired = np.array([per_block[problem.model_units[u.name].block] for u in ctx.space.units])
        return closest_feasible(ctx, desired, "sparsity")

    def shortgpt(ctx: Context) -> np.ndarray:
        if kind != "drop":
            raise EvosearchError("sampler 'shortgpt' drops blocks; use it with a drop space")
        influence = np.array([stats[u.name]["block_influence"] for u in ctx.space.units])
        x = np.zeros(len(ctx.space.units), dtype=np.int64)  # level 0 = keep
        for unit in np.argsort(influence, kind="stable"):
            if ctx.feasibility.is_met(x):
                break
            x[unit] = 1
        if not ctx.feasibility.is_met(x):
            raise EvosearchError("shortgpt: dropping by influence never met the budget")
        return x

    register("owl", lambda: FixedAssignment("owl", owl))
    register("shortgpt", lambda: FixedAssignment("shortgpt", shortgpt))
