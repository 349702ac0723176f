"""Heuristic baselines that allocate compression from per-unit scores of the dense model.

- ``owl``: Outlier-Weighted Layerwise sparsity (Yin et al., 2023). A block with more
  outlier weights (Wanda score above M = 5 times its layer's mean) keeps more weights:
  block sparsities spread over ``[target - lambda, target + lambda]`` (lambda = 0.08)
  in order of their outlier ratios, averaging the target.
- ``shortgpt``: ShortGPT's block influence (Men et al., 2024): drop the units whose
  residual stream changes least (lowest 1 - cos(input, output)) until the budget is met.

Both need statistics gathered while the database is built: ``for_problem(name, problem,
stats)`` builds the sampler object for one problem (two problems in one process never
share one). Each evaluates its single assignment once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from evosearch.errors import EvosearchError
from evosearch.samplers.base import Sampler
from evosearch.space import Feasibility

if TYPE_CHECKING:
    from evosearch.problem import SearchProblem
    from evosearch.samplers.base import Context

OWL_LAMBDA = 0.08
HEURISTICS = ("owl", "shortgpt")


class FixedAssignment(Sampler):
    """Evaluates one precomputed assignment (level indices) at the full fidelity."""

    def __init__(self, name: str, compute):
        self.name = name
        self.compute = compute

    def run(self, ctx: Context) -> None:
        assignment = ctx.space.assignment(self.compute(ctx))
        fidelity = ctx.fidelities[-1]
        ctx.progress.start(1)
        ctx.evaluator.evaluate([assignment], fidelity, attrs={"heuristic": self.name})
        ctx.evaluator.complete([assignment], fidelity)
        ctx.progress.advance()


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


def for_problem(name: str, problem: SearchProblem, stats: dict[str, dict[str, float]]) -> FixedAssignment:
    """The heuristic sampler ``name`` (``owl`` or ``shortgpt``) for ``problem``, from the database's statistics."""
    space = problem.space
    if name == "owl":
        if "sparsity" not in space.resources or problem.budget.resource != "sparsity":
            raise EvosearchError("sampler 'owl' allocates sparsity; use it with a sparsity space")
        block_of = [problem.model_units[u.name].block for u in space.units]
        ratios = {b: stats[problem.arch.block_name(b)]["outlier_ratio"] for b in sorted(set(block_of))}
        return FixedAssignment("owl", lambda ctx: _owl(ctx, block_of, ratios, problem.budget.target))
    if name == "shortgpt":
        if "dropped" not in space.resources:
            raise EvosearchError("sampler 'shortgpt' drops blocks; use it with a drop space")
        influence = np.array([stats[u.name]["block_influence"] for u in space.units])
        return FixedAssignment("shortgpt", lambda ctx: _shortgpt(ctx, influence))
    raise EvosearchError(f"{name!r} is not a heuristic sampler; heuristics: {', '.join(HEURISTICS)}")


def _owl(ctx: Context, block_of: list[int], ratios: dict[int, float], target: float) -> np.ndarray:
    """OWL's block sparsities (each unit takes its block's), then the closest feasible levels."""
    per_block = dict(zip(ratios, owl_sparsities(np.array(list(ratios.values())), target)))
    return closest_feasible(ctx, np.array([per_block[b] for b in block_of]), "sparsity")


def _shortgpt(ctx: Context, influence: np.ndarray) -> np.ndarray:
    """Drop the units of least influence until the budget is met."""
    x = np.zeros(len(ctx.space.units), dtype=np.int64)  # level 0 = keep
    for unit in np.argsort(influence, kind="stable"):
        if ctx.feasibility.is_met(x):
            break
        x[unit] = 1
    if not ctx.feasibility.is_met(x):
        raise EvosearchError("shortgpt: dropping by influence never met the budget")
    return x
