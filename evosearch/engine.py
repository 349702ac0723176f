"""The search engine: one entry point, `search`, on top of an Optuna study.

Every evaluated candidate is a trial of an Optuna study, so a search can be
inspected with plain Optuna, shared through its storage and resumed. Multi-fidelity
evaluation maps onto Optuna's own concepts: a candidate's score at a fidelity is
``trial.report(value, step=fidelity)``; a candidate dropped between selection stages
is PRUNED, with no value (its scores are its reports); one that reaches the last stage is
COMPLETE with its value there; a NaN or infinite score marks the trial FAIL and the
candidate loses. Each trial stores the
evaluated assignment, its usage of each budget and whether it meets them all as user
attributes. A trial whose assignment breaks a budget (only the `dp` baseline's
single-unit probes do) also carries Optuna constraints (``trial.set_constraint``,
the excess per budget), so that a plain Optuna reader of the study never takes it
for the best. The samplers' own candidates always meet the budget (by construction
or by repair), so they carry none: a constraint that is always met tells a sampler
nothing, and GP then fits a feasibility model for nothing (20 GP trials on a 16-unit
problem: 8.1 s with such constraints, 3.8 s without).

The fitness is a ``Fitness``: an object with ``evaluate_batch(assignments, fidelity) ->
values`` (lower is better) and ``fidelities``, the fidelities it can score at (say, numbers
of calibration tokens, increasing) or None for a single-fidelity fitness (then ``fidelity``
is None). A whole selection stage is one batch, for GPU batching or for worker processes
(`evosearch.workers.Workers`); one that evaluates in parallel says how many at once as
``parallelism``, and Optuna's samplers then ask that many trials at a time. One that can
start a batch and be waited for later has ``submit(assignments, fidelity)``, which returns
a function that waits for the values: the engine opens the candidates' trials in between.
A plain function ``f(assignment) -> float`` is a single-fidelity fitness
(``FunctionFitness`` wraps it; ``FunctionFitness(f, fidelities=[...])`` one called as
``f(assignment, fidelity)``). The fitness must be deterministic: a value is computed once
per (assignment, fidelity).

Resume: the `Evaluator` reads every value already in the storage (reports of all
trials, whatever their state) into a memo, and samplers derive their random numbers
from ``(seed, step)``. A resumed EvoPress or baseline search therefore replays its
trajectory from the start, taking each finished evaluation from the memo instead of
calling the fitness, and goes on exactly where it stopped. Optuna's samplers resume
by continuing the study from its trials (their own random state is not restored, so
that continuation is not bit-identical to an uninterrupted run). Trials left RUNNING
by a dead process are marked FAIL on resume; their reports stay in the memo. Resume
assumes no other process is working on the same study (workers write to a study of
their own, see `evosearch.workers`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from pydantic import BaseModel
from tqdm.auto import tqdm

from evosearch.errors import EvosearchError
from evosearch.samplers import make_sampler
from evosearch.samplers.base import Context, Sampler, SearchStopped
from evosearch.samplers.baselines import uniform_candidates
from evosearch.space import Assignment, Budget, Feasibility, Space
from evosearch.version import __version__

logger = logging.getLogger("evosearch")


@runtime_checkable
class Fitness(Protocol):
    """What `search` scores candidates with (see the module docstring); lower is better."""

    fidelities: list[int] | None  # increasing fidelities it scores at, or None: one fidelity

    def evaluate_batch(self, assignments: list[Assignment], fidelity: int | None) -> list[float]: ...


class FunctionFitness:
    """A plain function as a ``Fitness``: ``f(assignment)``, or with ``fidelities`` ``f(assignment, fidelity)``."""

    def __init__(self, function: Callable, fidelities: list[int] | None = None):
        self.function = function
        self.fidelities = None if fidelities is None else list(fidelities)

    def evaluate_batch(self, assignments: list[Assignment], fidelity: int | None) -> list[float]:
        if self.fidelities is None:
            return [self.function(a) for a in assignments]
        return [self.function(a, fidelity) for a in assignments]


def as_fitness(fitness) -> Fitness:
    """A ``Fitness`` as it is, a plain function as a single-fidelity ``FunctionFitness``."""
    if hasattr(fitness, "evaluate_batch"):
        return fitness
    if not callable(fitness):
        raise EvosearchError("fitness must be a Fitness (evaluate_batch, fidelities) or a function f(assignment)")
    if getattr(fitness, "fidelities", None) is not None:
        raise EvosearchError("a multi-fidelity fitness function: pass FunctionFitness(f, fidelities=[...]) instead "
                             "of setting f.fidelities")
    return FunctionFitness(fitness)


class Evaluator:
    """Every fitness call of a search goes through here.

    `evaluate` scores assignments at a fidelity, taking values from the memo when
    they are known, and records new ones as reports of Optuna trials; a candidate's
    trial stays open (RUNNING) until the sampler calls `prune` or `complete`.
    """

    def __init__(
        self,
        study: optuna.Study,
        space: Space,
        budgets: list[Budget],
        fitness: Fitness,
        max_evaluations: int | None,
        tradeoff: Budget | None,
        bar: tqdm,
    ):
        self.study, self.space, self.budgets = study, space, budgets
        self.max_evaluations = max_evaluations
        self.tradeoff = tradeoff
        self.bar = bar
        self._submit = _submitter(fitness)
        self._batched = not isinstance(fitness, FunctionFitness)  # a function is called one assignment at a time
        self.memo: dict[tuple[tuple[int, ...], int], float] = {}
        self._open: dict[tuple[int, ...], optuna.Trial] = {}
        self.best = math.inf
        for trial in study.get_trials(deepcopy=False):
            if "assignment" not in trial.user_attrs:
                continue
            key = self.key(trial.user_attrs["assignment"])
            for step, value in trial.intermediate_values.items():
                self.memo[key, step] = value
            if trial.state == TrialState.COMPLETE:  # multi-objective trials cannot report
                self.memo[key, trial.user_attrs["fidelity"]] = trial.values[0]
            if "failed_fidelity" in trial.user_attrs:
                self.memo[key, trial.user_attrs["failed_fidelity"]] = math.inf
            if trial.state == TrialState.COMPLETE and trial.user_attrs.get("feasible"):
                self.best = min(self.best, trial.values[0])
        self.n_evaluations = len(self.memo)

    def key(self, assignment: Assignment) -> tuple[int, ...]:
        return tuple(int(i) for i in self.space.indices(assignment))

    def evaluate(
        self,
        assignments: list[Assignment],
        fidelity: int,
        trials: list[optuna.Trial] | None = None,
        attrs: dict[str, Any] | None = None,
    ) -> list[float]:
        """Values of `assignments` at `fidelity` (inf for a failed one).

        `trials` are trials a sampler already asked for these assignments (Optuna's
        samplers); otherwise a trial is opened for each assignment that needs a new
        evaluation, with `attrs` as extra user attributes.
        """
        keys = [self.key(a) for a in assignments]
        for key, assignment, trial in zip(keys, assignments, trials or []):
            self._annotate(trial, assignment, attrs)
            self._open[key] = trial
        todo = {k: a for k, a in zip(keys, assignments) if (k, fidelity) not in self.memo}
        todo = list(todo.items())
        step = max(len(todo), 1) if self._batched else 1  # a replayed stage may need nothing new
        for start in range(0, len(todo), step):
            if self.max_evaluations is not None and self.n_evaluations >= self.max_evaluations:
                raise SearchStopped
            batch = todo[start : start + step]
            chunk = batch if self.max_evaluations is None else batch[: self.max_evaluations - self.n_evaluations]
            wait = self._submit([a for _, a in chunk], fidelity)
            for key, assignment in chunk:
                if key not in self._open:
                    self._open[key] = self.study.ask()
                    self._annotate(self._open[key], assignment, attrs)
            values = wait()
            for (key, _), value in zip(chunk, values):
                self._record(key, fidelity, float(value))
            if len(chunk) < len(batch):
                raise SearchStopped  # the cap cut this batch short
        return [self.memo[k, fidelity] for k in keys]

    def _annotate(self, trial: optuna.Trial, assignment: Assignment, attrs: dict | None) -> None:
        trial.set_user_attr("assignment", assignment)
        usage = {b.label: b.usage(self.space, assignment) for b in self.budgets}
        excess = {b.label: max(usage[b.label] - b.bounds()[1], b.bounds()[0] - usage[b.label]) for b in self.budgets}
        feasible = all(e <= 0 for e in excess.values())
        trial.set_user_attr("usage", usage)
        trial.set_user_attr("feasible", feasible)
        if not feasible:  # see the module docstring: only infeasible trials carry constraints
            for label, value in excess.items():
                trial.set_constraint(label, value)
        for name, value in (attrs or {}).items():
            trial.set_user_attr(name, value)

    def _record(self, key: tuple[int, ...], fidelity: int, value: float) -> None:
        self.n_evaluations += 1
        trial = self._open[key]
        if math.isfinite(value):
            if self.tradeoff is None:  # Optuna keeps no intermediate values for multi-objective trials
                trial.report(value, step=fidelity)
            self.memo[key, fidelity] = value
        else:
            logger.warning("trial %d: fitness returned %r at fidelity %d; marking it FAIL", trial.number, value, fidelity)
            trial.set_user_attr("failed_fidelity", fidelity)
            self.study.tell(trial, state=TrialState.FAIL)
            del self._open[key]
            self.memo[key, fidelity] = math.inf

    def prune(self, assignments: list[Assignment]) -> None:
        """Close the open trials of candidates dropped by selection."""
        for key in map(self.key, assignments):
            if key in self._open:
                self._close(self._open.pop(key), TrialState.PRUNED)

    def complete(self, assignments: list[Assignment], fidelity: int) -> None:
        """Close the open trials of candidates that reached the last stage, with their value there."""
        for key, assignment in zip(map(self.key, assignments), assignments):
            if key not in self._open:
                continue
            trial = self._open.pop(key)
            value = self.memo[key, fidelity]
            trial.set_user_attr("fidelity", fidelity)
            trial.set_user_attr("evaluations", self.n_evaluations)  # done when it completed: convergence plots
            values = [value]
            if self.tradeoff is not None:
                values.append(self.tradeoff.usage(self.space, assignment))
            self.study.tell(trial, values)
            if trial.user_attrs["feasible"] and value < self.best:
                self.best = value
                self.bar.set_postfix(best=f"{value:.5g}")

    def close(self, state: TrialState) -> None:
        """Close every open trial with `state` (when the search stops or is interrupted)."""
        for trial in self._open.values():
            self._close(trial, state)
        self._open.clear()

    def _close(self, trial: optuna.Trial, state: TrialState) -> None:
        """Finish a trial with no value. ``Study.tell(trial, state=PRUNED)`` would make its last report its
        value, and plain Optuna readers (optuna-dashboard) then plot a candidate dropped at a low fidelity,
        scored on fewer tokens, as better than the best. Its reports stay: resume reads them. Optuna has
        no public call for this; this is what tell does, less that value."""
        frozen = self.study._storage.get_trial(trial._trial_id)
        self.study.sampler.after_trial(self.study, frozen, state, None)  # what tell does before storing
        self.study._storage.set_trial_state_values(trial._trial_id, state, None)


def fidelities_of(fitness: Fitness) -> list[int]:
    """The fitness' declared fidelities, or [0] for a single-fidelity fitness."""
    declared = getattr(fitness, "fidelities", None)
    if declared is None:
        return [0]
    fidelities = list(declared)
    if not fidelities or any(not isinstance(f, (int, np.integer)) or f < 0 for f in fidelities) or fidelities != sorted(set(fidelities)):
        raise EvosearchError(
            f"fitness.fidelities must be increasing non-negative integers such as [2048, 16384], got {declared!r}"
        )
    return [int(f) for f in fidelities]


def _submitter(fitness: Fitness) -> Callable[[list[Assignment], int], Callable[[], list[float]]]:
    """``submit(assignments, fidelity)`` returns a function that waits for their values. A fitness
    with its own ``submit`` starts evaluating at once (workers do, while the trials are opened);
    any other is called when the values are waited for, after its trials are open."""
    multi = getattr(fitness, "fidelities", None) is not None
    if hasattr(fitness, "submit"):
        return lambda assignments, fidelity: fitness.submit(assignments, fidelity if multi else None)
    return lambda assignments, fidelity: lambda: list(fitness.evaluate_batch(assignments, fidelity if multi else None))


class _BarProgress:
    """The samplers' ``Progress``, drawn as a tqdm bar the engine owns."""

    def __init__(self, bar: tqdm):
        self.bar = bar

    def start(self, total: int | None, unit: str = "it") -> None:
        self.bar.reset(total=total)
        self.bar.unit = unit

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)


class Candidate(BaseModel):
    """An evaluated assignment."""

    assignment: dict[str, int | float | str]
    value: float
    fidelity: int
    usage: dict[str, float]
    trial: int


class TrialRecord(BaseModel):
    number: int
    state: str
    assignment: dict[str, int | float | str] | None
    value: float | None  # the final value of a COMPLETE trial
    fidelity: int | None
    reports: dict[int, float]  # value at each fidelity it was scored at
    usage: dict[str, float]
    feasible: bool


class Point(BaseModel):
    """One complete candidate that meets the budget: its fitness, and when the search had it."""

    trial: int
    value: float
    fidelity: int
    evaluations: int  # fitness evaluations done when it completed
    usage: dict[str, float]
    tradeoff: float | None = None  # the second objective of a multi-objective search
    assignment: dict[str, int | float | str]


class History(BaseModel):
    """A study's candidates, as ``show``, ``report`` and ``SearchResult`` read them (``history``)."""

    name: str
    states: dict[str, int]  # trials per state
    evaluations: int  # fitness evaluations stored (one per assignment and fidelity)
    budgets: list[dict]
    sampler: str
    tradeoff: dict | None = None  # a multi-objective search's second objective: {"label", "direction"}
    points: list[Point]  # complete feasible candidates at the highest fidelity any reached, in completion order
    runs: list[float] = []  # seconds of each run of the search (``_add_run``), interrupted ones too

    @property
    def best(self) -> Point | None:
        return min(self.points, key=lambda p: (p.value, p.trial)) if self.points else None

    def pareto(self) -> list[Point]:
        """Candidates no other beats on both fitness and the traded-off resource (multi-objective only),
        one per assignment, by fitness."""
        if self.tradeoff is None:
            return []
        sign = 1 if self.tradeoff["direction"] == "minimize" else -1
        unique = {json.dumps(p.assignment, sort_keys=True): p for p in self.points}.values()
        scored = [(p, (p.value, sign * p.tradeoff)) for p in unique]
        front = [p for p, a in scored if not any(b[0] <= a[0] and b[1] <= a[1] and b != a for _, b in scored)]
        return sorted(front, key=lambda p: (p.value, p.trial))


def history(study: optuna.Study) -> History:
    """The candidates of an evosearch study. A trial records the evaluations done when it completed
    (``Evaluator.complete``); for studies of evosearch < 0.2, which did not, they are counted here as
    the engine's memo counts them: one per (assignment, fidelity), by the first trial that needed it,
    in the order trials were closed."""
    settings = study.user_attrs.get("evosearch", {})
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    states: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    new_evaluations = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
        if "assignment" not in t.user_attrs:
            continue
        key = json.dumps(t.user_attrs["assignment"], sort_keys=True)
        steps = set(t.intermediate_values)
        if t.state == TrialState.COMPLETE:
            steps.add(t.user_attrs.get("fidelity", 0))
        if "failed_fidelity" in t.user_attrs:
            steps.add(t.user_attrs["failed_fidelity"])
        new_evaluations[t.number] = len({(key, step) for step in steps} - seen)
        seen.update((key, step) for step in steps)
    done, points = 0, []
    for t in sorted((t for t in trials if t.datetime_complete), key=lambda t: (t.datetime_complete, t.number)):
        done += new_evaluations.get(t.number, 0)
        if t.state == TrialState.COMPLETE and t.user_attrs.get("feasible") and "assignment" in t.user_attrs:
            points.append(Point(trial=t.number, value=t.values[0], fidelity=t.user_attrs.get("fidelity", 0),
                                evaluations=t.user_attrs.get("evaluations", done), usage=t.user_attrs.get("usage", {}),
                                tradeoff=t.values[1] if len(t.values) > 1 else None,
                                assignment=t.user_attrs["assignment"]))
    top = max((p.fidelity for p in points), default=0)
    return History(name=study.study_name, states=states, evaluations=len(seen), budgets=settings.get("budgets", []),
                   sampler=settings.get("sampler", "?"), tradeoff=_tradeoff(study, settings),
                   points=[p for p in points if p.fidelity == top], runs=study.user_attrs.get("runs", []))


def _tradeoff(study: optuna.Study, settings: dict) -> dict | None:
    """The second objective, named like the engine measures it: the budget on its resource, else a total."""
    if len(study.directions) < 2:
        return None
    budgets = settings.get("budgets") or [{}]
    resource = settings.get("sampler_options", {}).get("resource") or budgets[0].get("resource", "resource")
    budget = next((b for b in budgets if b.get("resource") == resource), {})
    form = "average" if "average" in budget or "max_average" in budget else "total"
    return {"label": f"{form} {resource}", "direction": study.directions[1].name.lower()}


class SearchResult(BaseModel):
    """What a search found. JSON-serialisable (``result.model_dump_json()``)."""

    best: Candidate
    pareto: list[Candidate]  # fitness vs the traded-off resource (multi-objective samplers only)
    trials: list[TrialRecord]
    history: History
    n_evaluations: int  # fitness calls stored in the study, over all runs of it
    study_name: str
    settings: dict[str, Any]
    wall_time: float  # seconds spent in this call
    runs: list[float] = []  # seconds of each call on this study so far (interrupted ones too), this one last


def search(
    space: Space,
    fitness: Fitness | Callable,
    budget: Budget | list[Budget],
    sampler: str | Sampler = "evopress",
    n_trials: int | None = None,
    seed: int = 0,
    storage: str | BaseStorage | None = None,
    study_name: str | None = None,
    resume: bool = False,
    sampler_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> SearchResult:
    """Find the assignment with the lowest fitness that meets every budget.

    Args:
        space: the units and their levels.
        fitness: a ``Fitness`` or a function ``f(assignment) -> float``, lower is better; see the
            module docstring.
        budget: one `Budget` or a list; every one is a hard constraint.
        sampler: a name (see `evosearch.samplers.SAMPLERS`) or a `Sampler` object.
        n_trials: the most fitness evaluations the whole study may hold (Optuna's
            samplers also run at most this many trials). Required by Optuna's
            samplers; EvoPress stops at its `generations` otherwise.
        seed: seeds every random choice of the sampler.
        storage: None (in memory), a database URL (``sqlite:///search.db``,
            ``postgresql://...``), a journal file (a path ending in ``.log`` or
            ``.journal``, or any path prefixed with ``journal:``), or an Optuna storage.
        study_name: name of the study in the storage (default: derived from the
            sampler and the space).
        resume: continue the study of this name; it must have the same settings.
        sampler_options: keyword arguments for the sampler.
        progress: show a tqdm progress bar.
    """
    started = time.perf_counter()
    budgets = [budget] if isinstance(budget, Budget) else list(budget)
    if not budgets:
        raise EvosearchError("budget: give at least one Budget")
    if len({b.label for b in budgets}) != len(budgets):
        raise EvosearchError(f"budget: two budgets of the same form on one resource: {[b.label for b in budgets]}")
    for b in budgets:
        b.check(space)
    fitness = as_fitness(fitness)
    fidelities = fidelities_of(fitness)
    options = dict(sampler_options or {})
    if isinstance(sampler, str):
        name, sampler = sampler, make_sampler(sampler, options)
    elif options:
        raise EvosearchError("sampler_options apply to a sampler given by name; configure the Sampler object instead")
    else:
        name = type(sampler).__name__
    tradeoff = None
    if sampler.tradeoff is not None:
        # The traded-off resource is measured like its budget (a total or an average).
        resource = sampler.tradeoff[0] or budgets[0].resource
        tradeoff = next((b for b in budgets if b.resource == resource), Budget(resource=resource, max_total=math.inf))
        tradeoff.table(space)  # an unknown resource is an error
    settings = {
        "evosearch": __version__,
        "space": space.hash(),
        "sampler": name,
        "sampler_options": options,
        "seed": seed,
        "budgets": [b.model_dump(exclude_none=True) for b in budgets],
        "fidelities": fidelities,
    }
    settings = json.loads(json.dumps(settings))  # tuples become lists, as stored
    study_name = study_name or f"evosearch-{name}-{space.hash()[:8]}"
    anchor = uniform_candidates(space, budgets)[0]

    directions = ["minimize"] + ([sampler.tradeoff[1]] if sampler.tradeoff else [])
    with _quiet_optuna():
        study = optuna.create_study(
            storage=_storage(storage), study_name=study_name, directions=directions, load_if_exists=True
        )
    _check_study(study, settings, resume)

    bar = tqdm(disable=not progress, desc=f"evosearch {name}", dynamic_ncols=True)
    evaluator = Evaluator(study, space, budgets, fitness, n_trials, tradeoff, bar)
    ctx = Context(space, budgets, Feasibility(space, budgets), anchor, seed, fidelities, n_trials, study, evaluator,
                  _BarProgress(bar), parallelism=getattr(fitness, "parallelism", 1))
    try:
        with _quiet_optuna():
            sampler.run(ctx)
    except SearchStopped:
        logger.info("stopped at n_trials=%d evaluations", n_trials)
        evaluator.close(TrialState.PRUNED)
    except KeyboardInterrupt:
        evaluator.close(TrialState.FAIL)
        _add_run(study, started)
        if storage is None:
            logger.warning("search interrupted; this in-memory study is lost (pass storage=... to make it resumable)")
        else:
            logger.warning(
                "search interrupted after %d evaluations; they are stored in study %r: "
                "call search(..., storage=%r, study_name=%r, resume=True) with the same settings to continue",
                evaluator.n_evaluations, study_name, storage, study_name,
            )
        raise
    finally:
        bar.close()
    runs = _add_run(study, started)
    return _result(study, space, evaluator, settings, time.perf_counter() - started, runs)


def _add_run(study: optuna.Study, started: float) -> list[float]:
    """Add this run's seconds to the study's ``runs`` (a user attribute): what a search took is the
    sum over the runs of it, which a resumed one would otherwise not know."""
    runs = [*study.user_attrs.get("runs", []), round(time.perf_counter() - started, 3)]
    study.set_user_attr("runs", runs)
    return runs


def journal_path(storage: str) -> str | None:
    """The file of a journal storage (a path ending in .log or .journal, or 'journal:path'); None for a URL."""
    if storage.startswith("journal:"):
        return storage[len("journal:") :]
    return storage if storage.endswith((".log", ".journal")) else None


def _storage(storage: str | BaseStorage | None) -> BaseStorage | None:
    """The storage `storage` names, opened: a database server out of reach, or a journal file in a
    folder that does not exist, fails here in one line instead of a traceback from the first read."""
    if not isinstance(storage, str):
        return storage
    journal = journal_path(storage)
    if journal is not None:
        try:
            return JournalStorage(JournalFileBackend(journal))
        except OSError as exc:
            folder = Path(journal).parent
            why = f"its folder {folder} does not exist" if not folder.is_dir() else exc.strerror
            raise EvosearchError(f"storage {storage}: cannot open the journal file ({why}); check the path") from None
    if "://" not in storage:
        raise EvosearchError(
            f"storage {storage!r}: give a database URL (sqlite:///path.db), a journal file "
            f"(path ending in .log or .journal, or 'journal:path'), or None"
        )
    try:
        return optuna.storages.get_storage(storage)  # what optuna.create_study makes of a URL
    except Exception as exc:  # SQLAlchemy's errors (server, URL), or the ImportError of a missing driver
        raise EvosearchError(_unopened(storage, exc)) from None


def _unopened(url: str, exc: Exception) -> str:
    """Why the database at `url` could not be opened, on one line (its password hidden)."""
    import sqlalchemy

    reason = (str(getattr(exc, "orig", None) or exc).strip() or type(exc).__name__).splitlines()[0]
    try:
        shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: SQLAlchemy's reason says so
        shown = url
    if url.startswith("sqlite"):
        return f"storage {shown}: cannot open the SQLite file ({reason}); check that its folder exists"
    if isinstance(exc, sqlalchemy.exc.OperationalError):
        return f"storage: cannot reach the database server at {shown} ({reason}); check the URL, or start the server"
    return f"storage {shown}: Optuna cannot open this database URL ({reason}); e.g. postgresql://user@host/db"


def _check_study(study: optuna.Study, settings: dict, resume: bool) -> None:
    stored = study.user_attrs.get("evosearch")
    trials = study.get_trials(deepcopy=False)
    if stored is None and not trials:
        study.set_user_attr("evosearch", settings)
        return
    if not resume:
        raise EvosearchError(
            f"study {study.study_name!r} already has {len(trials)} trials in this storage; "
            f"pass resume=True to continue it, or choose another study_name"
        )
    if stored is None:
        raise EvosearchError(f"study {study.study_name!r} was not made by evosearch.search; choose another study_name")
    for key in settings:
        if key != "evosearch" and _path_setting(key, stored.get(key)) != _path_setting(key, settings[key]):
            raise EvosearchError(
                f"cannot resume study {study.study_name!r}: it was run with {key}={stored.get(key)!r}, "
                f"this call has {key}={settings[key]!r} (use the same settings, or a new study_name)"
            )
    stale = [t for t in trials if t.state == TrialState.RUNNING]
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
    logger.info("resuming study %r: %d trials, %d left RUNNING marked FAIL", study.study_name, len(trials), len(stale))


def _path_setting(key: str, value: Any) -> Any:
    """A stored setting as far as it fixes the search's path: EvoPress's generations only say where
    it stops (each generation's random stream is its own), so a resume may run longer."""
    if key == "sampler_options" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "generations"}
    return value


@contextmanager
def _quiet_optuna():
    """Optuna logs every trial at INFO; a search makes thousands, so keep it to warnings."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def _result(study: optuna.Study, space: Space, evaluator: Evaluator, settings: dict, wall_time: float,
            runs: list[float]) -> SearchResult:
    records = [TrialRecord(number=t.number, state=t.state.name, assignment=t.user_attrs.get("assignment"),
                           value=t.values[0] if t.state == TrialState.COMPLETE else None,
                           fidelity=t.user_attrs.get("fidelity") if t.state == TrialState.COMPLETE else None,
                           reports=t.intermediate_values, usage=t.user_attrs.get("usage", {}),
                           feasible=t.user_attrs.get("feasible", False))
               for t in study.get_trials(deepcopy=False)]
    found = history(study)
    if found.best is None:
        raise EvosearchError(
            f"study {study.study_name!r} has no complete candidate that meets the budget "
            f"(raise n_trials, or check the fitness: {sum(r.state == 'FAIL' for r in records)} trials failed)"
        )

    def candidate(p: Point) -> Candidate:
        return Candidate(assignment=p.assignment, value=p.value, fidelity=p.fidelity, usage=p.usage, trial=p.trial)

    return SearchResult(
        best=candidate(found.best),
        pareto=[candidate(p) for p in found.pareto()],
        trials=records,
        history=found,
        n_evaluations=evaluator.n_evaluations,
        study_name=study.study_name,
        settings=settings,
        wall_time=wall_time,
        runs=runs,
    )
