"""What a sampler is and what it sees: the protocol below both the engine and the samplers.

A sampler is an object with one method, ``run(ctx)``, that drives a search: it proposes
assignments and asks ``ctx.evaluator`` to score them, closing each candidate's trial with
``prune`` or ``complete``. It keeps no state of its own beyond its options; everything it
learns is in the study, and every random choice comes from ``ctx.rng(step)``, so a resumed
search replays it (see `evosearch.engine`). It says how far it has got through
``ctx.progress`` and never touches a progress bar itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import optuna

from evosearch.space import Assignment, Budget, Feasibility, Space


class SearchStopped(Exception):
    """Raised inside a sampler when the evaluation cap (n_trials) is reached."""


class Evaluation(Protocol):
    """The engine's side of every fitness call (``evosearch.engine.Evaluator``)."""

    n_evaluations: int

    def key(self, assignment: Assignment) -> tuple[int, ...]: ...

    def evaluate(self, assignments: list[Assignment], fidelity: int, trials: list[optuna.Trial] | None = None,
                 attrs: dict[str, Any] | None = None) -> list[float]: ...

    def prune(self, assignments: list[Assignment]) -> None: ...

    def complete(self, assignments: list[Assignment], fidelity: int) -> None: ...


class Progress(Protocol):
    """Where a sampler reports how far it is: ``start`` with the steps it will take, ``advance`` per step."""

    def start(self, total: int | None, unit: str = "it") -> None: ...

    def advance(self, steps: int = 1) -> None: ...


@dataclass
class Context:
    """What a sampler gets: the problem, the study, the evaluator and where to report progress."""

    space: Space
    budgets: list[Budget]
    feasibility: Feasibility
    anchor: np.ndarray  # a feasible assignment (level indices), the target of repair
    seed: int
    fidelities: list[int]
    n_trials: int | None
    study: optuna.Study
    evaluator: Evaluation
    progress: Progress
    parallelism: int = 1  # evaluations the fitness runs at once (workers)

    def rng(self, *step: int) -> np.random.Generator:
        """The random stream of one step of the search; the same on every replay."""
        return np.random.default_rng([self.seed, *step])


class Sampler:
    """Base class of samplers. `tradeoff` is set by multi-objective samplers:
    (resource, "minimize" or "maximize"), the resource traded off against fitness."""

    tradeoff: tuple[str, str] | None = None

    def run(self, ctx: Context) -> None:
        raise NotImplementedError
