"""EvoPress: (1 + lambda) evolutionary search with level-switch mutation and
multi-step selection (Sieberling, Kuznedelev, Kurtic, Alistarh; arXiv 2410.14649).

One parent. Each generation makes `offspring` distinct children by *level switches*:
a switch raises one unit's level by one and lowers another unit's level by one,
both units from the same group, and a child gets min(U{1..3}, U{1..3}) switches
(1 with probability 5/9, as in the reference code). Units in a group are
interchangeable (equal-size layers with equally spaced levels), so a switch keeps
the budget exactly where it is; a child that nevertheless breaks a budget (unequal
units sharing a group) is discarded. Units with no group form one shared group.
A switch never moves budget between groups: with an equality budget each group keeps
the share it starts with, as in the reference code's size grouping.

An upper-bound budget (``max_total``, ``max_average``) that the parent does not use up
cannot be spent by switches; while that is so, each move of a child is, with probability
1/2, a single step of one unit up or down instead, and the children that still meet the
budget compete with the others (on a synthetic knapsack with unequal units this took the
final gap from 41% to 13%; equality budgets are searched exactly as before).

Selection runs in `stages`, ``[(fidelity, survivors), ...]``: all children are scored
at the first (cheap) fidelity, the best `survivors` go on to the next, and so on;
the parent joins the last stage, whose single survivor is the next parent (an
offspring wins a tie, which lets the search cross plateaus).

The first parent is the uniform assignment (the best of the uniform candidates at
the first stage's fidelity when there are several), or with `initial_candidates`
> 0 the best of that many random feasible assignments at that fidelity, or the best
of the given `starts` (assignments that meet the budget, e.g. a width space's uniform
sub-networks at several attention/MLP splits, which switches within a group cannot
reach from one another).

Defaults follow the reference code's unstructured-sparsity script
(``example_scripts/prune_search.sh``): 64 offspring, 400 generations, survivors
8, 2, 1 over three increasing token counts. With fewer fidelities the last stages
are used (2, 1; or just 1); with more, earlier stages keep 4x as many.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from evosearch.errors import EvosearchError
from evosearch.samplers.base import Sampler
from evosearch.samplers.baselines import uniform_candidates

if TYPE_CHECKING:
    from evosearch.samplers.base import Context

logger = logging.getLogger("evosearch")


class EvoPress(Sampler):
    def __init__(
        self,
        offspring: int = 64,
        generations: int = 400,
        stages: list[tuple[int, int]] | None = None,
        initial_candidates: int = 0,
        max_switches: int = 3,
        starts: list[dict] | None = None,
    ):
        if offspring < 1 or generations < 0 or initial_candidates < 0 or max_switches < 1:
            raise EvosearchError(
                "evopress: offspring and max_switches must be >= 1, generations and initial_candidates >= 0"
            )
        self.offspring = offspring
        self.generations = generations
        self.stages = [tuple(s) for s in stages] if stages is not None else None
        self.initial_candidates = initial_candidates
        self.max_switches = max_switches
        self.starts = starts

    def run(self, ctx: Context) -> None:
        stages = self._stages(ctx.fidelities)
        groups = self._groups(ctx)
        parent = self._initial(ctx, stages[0][0])
        ctx.progress.start(self.generations, unit="generation")
        for generation in range(1, self.generations + 1):
            rng = ctx.rng(generation)
            children = self._offspring(parent, groups, ctx, rng)
            if not children:
                # Every child breaks a budget: the parent has no neighbour to move to, now or later.
                logger.warning(
                    "evopress: no level switch from the parent keeps every budget, so the search cannot move "
                    "(levels not equally spaced in the budget's resource?); stopping at generation %d. "
                    "A sampler that repairs proposals (tpe, cmaes, random) fits this space better.", generation,
                )
                final = ctx.space.assignment(parent)
                ctx.evaluator.evaluate([final], stages[-1][0], attrs={"generation": generation})
                ctx.evaluator.complete([final], stages[-1][0])
                break
            before = ctx.evaluator.n_evaluations
            parent, value = self._select(children, parent, stages, ctx, generation)
            logger.info(
                "generation %d/%d: parent fitness %.6g, %d offspring, %d evaluations",
                generation, self.generations, value, len(children), ctx.evaluator.n_evaluations - before,
            )
            ctx.progress.advance()

    def _stages(self, fidelities: list[int]) -> list[tuple[int, int]]:
        if self.stages is None:
            # Survivors counted back from the last stage: 1, 2, 8, 32, ...
            k = len(fidelities)
            return [(f, min(self.offspring, 1 if j == 0 else 2 * 4 ** (j - 1))) for f, j in zip(fidelities, range(k - 1, -1, -1))]
        stages = self.stages
        if not stages or stages[-1][1] != 1:
            raise EvosearchError(f"evopress: stages must end with one survivor, e.g. [(2048, 8), (16384, 1)]; got {stages}")
        for fidelity, _ in stages:
            if fidelity not in fidelities:
                raise EvosearchError(
                    f"evopress: stage fidelity {fidelity} is not one of the fitness' fidelities {fidelities} "
                    f"(a multi-fidelity fitness declares them as fitness.fidelities)"
                )
        survivors = [s for _, s in stages]
        if [f for f, _ in stages] != sorted({f for f, _ in stages}) or survivors != sorted(survivors, reverse=True):
            raise EvosearchError(f"evopress: stages need increasing fidelities and non-increasing survivors; got {stages}")
        return stages

    def _groups(self, ctx: Context) -> list[np.ndarray]:
        names = [u.group for u in ctx.space.units]
        groups = [np.flatnonzero([g == name for g in names]) for name in dict.fromkeys(names)]
        for members in groups:
            if len(members) == 1:
                logger.warning(
                    "evopress: unit %r is alone in its group, so level switches never change it",
                    ctx.space.units[members[0]].name,
                )
        return [m for m in groups if len(m) > 1]

    def _initial(self, ctx: Context, fidelity: int) -> np.ndarray:
        if self.starts:
            candidates = [ctx.space.indices(start) for start in self.starts]
            if not all(ctx.feasibility.is_met(x) for x in candidates):
                raise EvosearchError("evopress: every assignment in starts must meet the budget")
        elif self.initial_candidates:
            rng = ctx.rng(0)
            candidates = {}
            for _ in range(self.initial_candidates):
                x = ctx.feasibility.repair(rng.integers(0, ctx.space.n_levels), rng, ctx.anchor)
                candidates[x.tobytes()] = x
            candidates = list(candidates.values())
        else:
            candidates = uniform_candidates(ctx.space, ctx.budgets)
        if len(candidates) == 1:
            return candidates[0]
        assignments = [ctx.space.assignment(x) for x in candidates]
        values = ctx.evaluator.evaluate(assignments, fidelity, attrs={"generation": 0})
        best = int(np.argmin(values))
        ctx.evaluator.prune(assignments[:best] + assignments[best + 1 :])
        return candidates[best]

    def _offspring(self, parent: np.ndarray, groups: list[np.ndarray], ctx: Context, rng: np.random.Generator) -> list[np.ndarray]:
        """`offspring` distinct feasible children of `parent` (fewer if hard to find)."""
        slack = _unused_budget(parent, ctx)
        if not groups and not slack:
            return []
        top = ctx.space.n_levels - 1
        weights = np.array([len(g) for g in groups], dtype=float)
        weights /= max(weights.sum(), 1.0)
        children, seen = [], {parent.tobytes()}
        for _ in range(100 * self.offspring):
            if len(children) == self.offspring:
                break
            child = parent.copy()
            switches = min(rng.integers(1, self.max_switches + 1), rng.integers(1, self.max_switches + 1))
            for _ in range(switches):
                if slack and (not groups or rng.random() < 0.5):  # a single step, which may spend the slack
                    unit = rng.integers(len(child))
                    child[unit] = np.clip(child[unit] + rng.choice((-1, 1)), 0, top[unit])
                    continue
                members = groups[rng.choice(len(groups), p=weights)]
                up = members[child[members] < top[members]]
                if len(up) == 0:
                    continue
                raised = rng.choice(up)
                down = members[(child[members] > 0) & (members != raised)]
                if len(down) == 0:
                    continue
                child[raised] += 1
                child[rng.choice(down)] -= 1
            key = child.tobytes()
            if key not in seen and ctx.feasibility.is_met(child):
                seen.add(key)
                children.append(child)
        return children

    def _select(self, children, parent, stages, ctx: Context, generation: int) -> tuple[np.ndarray, float]:
        candidates = children
        for i, (fidelity, survivors) in enumerate(stages):
            last = i == len(stages) - 1
            if last:
                candidates = candidates + [parent]
            assignments = [ctx.space.assignment(x) for x in candidates]
            values = ctx.evaluator.evaluate(assignments, fidelity, attrs={"generation": generation})
            order = np.argsort(values, kind="stable")
            if last:
                ctx.evaluator.complete(assignments, fidelity)
            else:
                ctx.evaluator.prune([assignments[j] for j in order[survivors:]])
            candidates = [candidates[j] for j in order[:survivors]]
            best_value = values[order[0]]
        return candidates[0], best_value


def _unused_budget(parent: np.ndarray, ctx: Context) -> bool:
    """Whether the parent leaves part of an upper-bound budget (max_total, max_average) unused.

    Switches keep the budget where it is, so they can never spend that part (units of unequal
    sizes, levels unequally spaced, a start below the limit): then children also take single
    steps of one unit, and those that still meet the budget compete like any other child.
    """
    usages, feasibility = ctx.feasibility.usages(parent), ctx.feasibility
    return any(b.form.startswith("max_") and usages[i] < feasibility.upper[i] - 1e-9 * feasibility.scale[i]
               for i, b in enumerate(ctx.budgets))
