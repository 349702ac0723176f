"""Heuristic baselines that allocate compression from per-unit scores of the dense model, tuned as published.

- ``owl``: Outlier-Weighted Layerwise sparsity (Yin et al., 2023). A block with more outlier
  weights (Wanda score above M times the mean score of the block's weights) keeps more of them:
  block sparsities spread over ``[target - lambda, target + lambda]`` in order of their outlier
  ratios, averaging the target. As in EvoPress's comparison, the sweep lambda in {0.02, 0.05,
  0.08, 0.1, 0.2} x M in {3, 5, 7, 10} is evaluated and the allocation of lowest KL kept.
- ``shortgpt``: ShortGPT's block influence (Men et al., 2024): remove the decoder blocks whose
  residual stream changes least (lowest 1 - cos(input, output)), whole blocks as published,
  until the budget is met; in a space of attention and MLP sub-blocks an odd count is made up
  by the sub-block of least influence of the next block.

Both need statistics gathered while the database is built: ``for_problem(name, problem,
stats)`` builds the sampler object for one problem (two problems in one process never share
one). Their candidates are evaluated at the full fidelity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from evosearch.errors import EvosearchError
from evosearch.samplers.base import Sampler
from evosearch.space import Feasibility

if TYPE_CHECKING:
    from evosearch.problem import SearchProblem
    from evosearch.samplers.base import Context

OWL_LAMBDAS = (0.02, 0.05, 0.08, 0.1, 0.2)
OWL_FACTORS = ("3", "5", "7", "10")  # the database's outlier factors M (database.build.OWL_OUTLIER_FACTORS)
HEURISTICS = ("owl", "shortgpt")


class FixedAssignments(Sampler):
    """Evaluates a few precomputed assignments (level indices, from ``compute(ctx)``) at the full fidelity;
    the search's answer is the best of them."""

    def __init__(self, name: str, compute: Callable[[Context], list[np.ndarray]]):
        self.name = name
        self.compute = compute

    def run(self, ctx: Context) -> None:
        distinct = {x.tobytes(): x for x in self.compute(ctx)}.values()
        assignments = [ctx.space.assignment(x) for x in distinct]
        fidelity = ctx.fidelities[-1]
        ctx.progress.start(len(assignments))
        ctx.evaluator.evaluate(assignments, fidelity, attrs={"heuristic": self.name})
        ctx.evaluator.complete(assignments, fidelity)
        ctx.progress.advance(len(assignments))


def owl_sparsities(outlier_ratio: np.ndarray, target: float, lam: float) -> np.ndarray:
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


def for_problem(name: str, problem: SearchProblem, stats: dict[str, dict]) -> FixedAssignments:
    """The heuristic sampler ``name`` (``owl`` or ``shortgpt``) for ``problem``, from the database's statistics."""
    space = problem.space
    if name == "owl":
        if "sparsity" not in space.resources or problem.budget.resource != "sparsity":
            raise EvosearchError("sampler 'owl' allocates sparsity; use it with a sparsity space")
        block_of = [problem.model_units[u.name].block for u in space.units]
        blocks = sorted(set(block_of))
        ratios = {m: np.array([stats[problem.arch.block_name(b)]["outlier_ratios"][m] for b in blocks])
                  for m in OWL_FACTORS}
        index = np.searchsorted(blocks, block_of)

        def owl(ctx: Context) -> list[np.ndarray]:
            target = problem.budget.target
            return [closest_feasible(ctx, owl_sparsities(ratios[m], target, lam)[index], "sparsity")
                    for lam in OWL_LAMBDAS for m in OWL_FACTORS]

        return FixedAssignments("owl", owl)
    if name == "shortgpt":
        if "dropped" not in space.resources:
            raise EvosearchError("sampler 'shortgpt' drops blocks; use it with a drop space")
        units = [problem.model_units[u.name] for u in space.units]
        influence = np.array([stats[u.name]["block_influence"] for u in units])
        whole = np.array([stats[problem.arch.block_name(u.block)]["block_influence"] for u in units])
        # Whole blocks first, by the block's influence; within a block, the sub-block of least influence first.
        order = np.lexsort((influence, whole))
        return FixedAssignments("shortgpt", lambda ctx: [_drop_in_order(ctx, order)])
    raise EvosearchError(f"{name!r} is not a heuristic sampler; heuristics: {', '.join(HEURISTICS)}")


def _drop_in_order(ctx: Context, order: np.ndarray) -> np.ndarray:
    """Drop units in ``order`` until the budget is met."""
    x = np.zeros(len(ctx.space.units), dtype=np.int64)  # level 0 = keep
    for unit in order:
        if ctx.feasibility.is_met(x):
            break
        x[unit] = 1
    if not ctx.feasibility.is_met(x):
        raise EvosearchError("shortgpt: dropping by influence never met the budget")
    return x
