"""Optuna's samplers (TPE, NSGA-II, CMA-ES, GP, random) driven through ask and tell.

Each unit is one integer parameter, its level *index*, so model-based samplers see
that levels are ordered. Optuna's samplers know nothing of the budget, so each
proposal is repaired before it is evaluated (`Feasibility.repair`: random units
step one level at a time towards the cheaper side until every budget holds). The
trial keeps the proposal as its parameters and records the repaired assignment, the
one actually evaluated, as its ``assignment`` attribute; its value is the fitness of
that assignment, so the sampler learns the fitness of "proposal, then repair".

Optuna 5 passes constraints to TPE, GP and NSGA-II through ``trial.set_constraint``
(``constraints_func`` is deprecated). We set none on these trials: the evaluated
assignment always meets the budget, and penalising the raw proposal instead would
backfire under an equality budget, where almost every proposal is off the budget
and a constrained sampler would see no feasible trial to learn from.

CMA-ES runs with margin (Hamano et al., 2022), Optuna's CMA-ES for integer
variables, which keeps the ordinal levels from collapsing onto one value. CatCMA is
made for unordered categories; it would discard the order of the levels.

`nsga2` is multi-objective: fitness against the usage of one `resource` (default:
the first budget's), minimised unless ``direction="maximize"``; the result carries
the Pareto set. Its budgets still hold for every trial.

With workers (``fitness.parallelism`` > 1) each round asks that many trials and tells
them together; TPE (``constant_liar``, on by default in Optuna 5) and GP treat the
trials still RUNNING as Optuna's parallel workers would. The result then depends on
the number of workers, not on their timing.

A resumed study continues from its trials; Optuna's samplers do not restore their
random state, so the continuation is not identical to an uninterrupted run.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.distributions import IntDistribution

from evosearch.errors import EvosearchError
from evosearch.samplers.base import Sampler

if TYPE_CHECKING:
    from evosearch.samplers.base import Context


class OptunaSampler(Sampler):
    def __init__(self, kind: str, **options: Any):
        self.kind = kind
        self.options = options
        self.make(seed=0)  # a bad option fails here, as a TypeError naming it

    def make(self, seed: int) -> optuna.samplers.BaseSampler:
        with warnings.catch_warnings():  # with_margin and deterministic_objective are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self.kind == "tpe":
                return optuna.samplers.TPESampler(seed=seed, **{"multivariate": True, **self.options})
            if self.kind == "cmaes":
                return optuna.samplers.CmaEsSampler(seed=seed, **{"with_margin": True, **self.options})
            if self.kind == "gp":
                return optuna.samplers.GPSampler(seed=seed, **{"deterministic_objective": True, **self.options})
            if self.kind == "nsga2":
                return optuna.samplers.NSGAIISampler(seed=seed, **self.options)
            return optuna.samplers.RandomSampler(seed=seed, **self.options)

    def run(self, ctx: Context) -> None:
        if ctx.n_trials is None:
            raise EvosearchError(f"sampler {self.kind!r} needs n_trials (the number of trials to run)")
        ctx.study.sampler = self.make(ctx.seed)
        space, fidelity = ctx.space, ctx.fidelities[-1]
        distributions = {u.name: IntDistribution(0, len(u.levels) - 1) for u in space.units}
        done = len(ctx.study.get_trials(deepcopy=False))
        ctx.progress.start(ctx.n_trials, unit="trial")
        ctx.progress.advance(done)
        while done < ctx.n_trials:
            # A batch of ask/tell, one trial per parallel evaluation: the trials asked earlier in
            # the batch are RUNNING when the next is asked, which TPE's constant liar and GP heed.
            trials = [ctx.study.ask(distributions) for _ in range(min(ctx.parallelism, ctx.n_trials - done))]
            assignments = []
            for trial in trials:
                proposal = np.array([trial.params[u.name] for u in space.units])
                x = ctx.feasibility.repair(proposal, ctx.rng(trial.number), ctx.anchor)
                trial.set_user_attr("repaired", bool((x != proposal).any()))
                assignments.append(space.assignment(x))
            first = {}  # repair may give two trials of a batch one assignment: evaluate it once
            for trial, assignment in zip(trials, assignments):
                first.setdefault(ctx.evaluator.key(assignment), (trial, assignment))
            ctx.evaluator.evaluate([a for _, a in first.values()], fidelity, trials=[t for t, _ in first.values()])
            ctx.evaluator.complete([a for _, a in first.values()], fidelity)
            for trial, assignment in zip(trials, assignments):
                if first[ctx.evaluator.key(assignment)][0] is not trial:  # its value is in the memo now
                    ctx.evaluator.evaluate([assignment], fidelity, trials=[trial])
                    ctx.evaluator.complete([assignment], fidelity)
            ctx.progress.advance(len(trials))
            done += len(trials)


class NSGAII(OptunaSampler):
    def __init__(self, resource: str | None = None, direction: str = "minimize", **options: Any):
        super().__init__("nsga2", **options)
        if direction not in ("minimize", "maximize"):
            raise EvosearchError(f"nsga2: direction must be 'minimize' or 'maximize', got {direction!r}")
        self.tradeoff = (resource, direction)  # resource None: the first budget's
