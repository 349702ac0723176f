"""Search on many workers: candidates are scored by worker processes that share nothing
with the search but its Optuna storage (a journal file on one host, PostgreSQL across hosts).

The process that runs `search` (the driver) keeps the sampler; the workers only
evaluate. Everything between them is in the storage, in two studies:

``<study>``
    The search, exactly as a one-process run writes it: a trial per candidate, its
    score at each fidelity as a report, PRUNED or COMPLETE as selection decides. Only
    the driver writes it, so resume works as in one process (`evosearch.engine`).
``<study>:evaluations``
    The work: one trial per evaluation of an (assignment, fidelity), user attributes
    ``assignment`` and ``fidelity``. The driver queues it (WAITING, ``enqueue_trial``);
    a worker claims it with the storage's atomic WAITING -> RUNNING switch (what
    ``Study.ask`` does to pop Optuna's queue), evaluates, and finishes it: COMPLETE with
    the value, or FAIL with user attribute ``value`` ("nan", "inf": the fitness' answer,
    final) or ``error`` (the fitness raised). The study's user attributes hold what a
    worker needs to rebuild the fitness (``options``, ``fidelities``), the heartbeat
    interval and ``finished``, set when the search is over.

A value is computed once per (assignment, fidelity), as in one process: the driver
looks an evaluation up before queueing it, so evaluations that workers finished while a
driver was down are taken, not redone, and queued ones are waited for, not queued again.

Fault tolerance. While it evaluates, a worker writes the time into the trial's system
attribute ``heartbeat`` every `heartbeat` seconds. The driver, waiting for a batch,
gives up an evaluation whose heartbeat has not changed for `grace` seconds of the
driver's own clock since it first saw it RUNNING (so no two hosts need agreeing clocks,
an evaluation shorter than a heartbeat costs no heartbeat write, and a worker that dies
before its first beat is caught too): it marks the trial FAIL, with no attribute, and
queues a new attempt (``retry_of``). Finishing a trial is an atomic state switch,
so of a lost worker that comes back and the driver that gave its evaluation up exactly
one wins: a result is never recorded twice. An evaluation that fails (lost worker or
exception) more than `retries` times in one run of the driver stops the search.
(Optuna's own heartbeat is RDB-only in Optuna 5, and skips a RUNNING trial that never
beat; this one works the same on every storage.)

With EvoPress (and the baselines) a selection stage is one batch: all its evaluations are
queued at once and the stage completes when their values are in, so the search takes
the same path as in one process and returns the same result. Optuna's samplers ask
``parallelism`` trials at a time (a batch of ask/tell); TPE's constant liar and GP see
the trials of the batch as RUNNING, as in Optuna's own parallel optimisation.

SQLite is not accepted here: it is a storage for one process.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from evosearch.engine import _quiet_optuna, _storage, as_fitness, fidelities_of
from evosearch.errors import EvosearchError
from evosearch.space import Assignment

logger = logging.getLogger("evosearch")

DEFAULT_FACTORY = "evosearch.pipeline:worker_fitness"
POLL = 0.05  # seconds between looks at the storage while waiting (after a short backoff from 2 ms)


def evaluations_study(study_name: str) -> str:
    """The name of the study that holds a search's evaluations."""
    return f"{study_name}:evaluations"


def open_storage(storage: str) -> BaseStorage:
    """A storage that workers and a driver can share: a journal file or a database server."""
    if storage.startswith("sqlite"):
        raise EvosearchError(
            f"storage {storage!r}: SQLite is a storage for one process; workers need a journal file "
            f"(a path ending in .journal, on one host) or a database server (postgresql://...)"
        )
    return _storage(storage)


def _key(assignment: Assignment, fidelity: int | None) -> tuple[str, int | None]:
    return json.dumps(assignment, sort_keys=True), fidelity


class Workers:
    """The fitness of a search whose evaluations run on worker processes.

    Pass it to `search` as the fitness: ``submit`` queues a batch of evaluations in
    the storage, and the function it returns waits until workers have reported their
    values (``evaluate_batch`` does both). As a context
    manager it starts `count` local workers (``local=True``: ``evosearch worker``
    processes, one per entry of `devices` round robin) and stops them at the end;
    with ``local=False`` it waits for workers started elsewhere. When the block ends
    without an error the study is marked finished and every worker exits.

    Args:
        storage: a journal file or a database URL, the one `search` gets.
        study_name: the search's study.
        count: how many workers evaluate at once (Optuna's samplers ask this many
            trials at a time); with ``local=True``, how many to start.
        options: JSON data from which `factory` rebuilds the fitness in each worker.
        fidelities: the fitness' fidelities, or None for a single-fidelity fitness.
        factory: ``module:function`` that local workers call as ``function(options, device)``.
        heartbeat, grace: seconds between a worker's heartbeats; seconds of silence
            after which the driver gives an evaluation up and queues it again.
        retries: how often one evaluation may fail before the search stops.
    """

    def __init__(self, storage: str, study_name: str, *, count: int, options: dict[str, Any] | None = None,
                 fidelities: list[int] | None = None, local: bool = True, factory: str = DEFAULT_FACTORY,
                 devices: list[str] | None = None, heartbeat: float = 5.0, grace: float = 30.0, retries: int = 3):
        if count < 1:
            raise EvosearchError(f"workers: give at least one worker, got {count}")
        if not 0 < heartbeat < grace:
            raise EvosearchError(f"workers: need 0 < heartbeat < grace, got heartbeat={heartbeat}, grace={grace}")
        self.parallelism = count
        self.fidelities = None if fidelities is None else list(fidelities)
        self.storage, self.study_name, self.local, self.factory = storage, study_name, local, factory
        self.devices, self.grace, self.retries = devices or [None], grace, retries
        self._store = open_storage(storage)
        with _quiet_optuna():
            self.queue = optuna.create_study(storage=self._store, study_name=evaluations_study(study_name),
                                             load_if_exists=True)
        self._study_id = self._store.get_study_id_from_name(self.queue.study_name)
        attrs = {"options": options or {}, "fidelities": fidelities, "heartbeat": heartbeat, "finished": False}
        for name, value in attrs.items():
            self.queue.set_user_attr(name, value)
        self._trials: list[FrozenTrial] = []  # the evaluations study as last read (index = trial number)
        self._indexed = 0  # how many of them are in `_attempts`
        self._attempts: dict[tuple[str, int | None], list[int]] = {}  # trial numbers of each evaluation
        self._beats: dict[int, tuple[Any, float]] = {}  # RUNNING trial -> (its heartbeat, when it was first seen)
        self._failures: dict[tuple[str, int | None], int] = {}  # failed attempts seen by this driver
        self.processes: list[subprocess.Popen] = []  # the local workers

    def __enter__(self) -> Workers:
        if not self.local:
            logger.info("waiting for %d workers; start each with: evosearch worker --storage %s --study %s",
                        self.parallelism, self.storage, self.study_name)
            return self
        for i in range(self.parallelism):
            device = self.devices[i % len(self.devices)]
            command = [sys.executable, "-m", "evosearch", "worker", "--storage", self.storage,
                       "--study", self.study_name, "--fitness", self.factory]
            self.processes.append(subprocess.Popen(command + (["--device", device] if device else [])))
        logger.info("started %d local workers (pids %s)", len(self.processes),
                    ", ".join(str(p.pid) for p in self.processes))
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.queue.set_user_attr("finished", True)  # idle workers exit at their next look
        else:  # interrupted or failed: stop local workers; each hands its evaluation back (FAIL) first
            for process in self.processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=60 if kind is None else 15)
            except subprocess.TimeoutExpired:
                logger.warning("local worker %d did not stop; killing it", process.pid)
                process.kill()
                process.wait()

    def evaluate_batch(self, assignments: list[Assignment], fidelity: int | None) -> list[float]:
        """The values of `assignments` at `fidelity`, evaluated by the workers."""
        return self.submit(assignments, fidelity)()

    def submit(self, assignments: list[Assignment], fidelity: int | None) -> Callable[[], list[float]]:
        """Queue the evaluations that no attempt holds yet; returns the function that waits for
        the values (`search` opens the candidates' trials while the workers start)."""
        keys = [_key(a, fidelity) for a in assignments]
        pending = dict(zip(keys, assignments))
        self._read()
        for key, assignment in pending.items():
            if key not in self._attempts:
                self._enqueue(assignment, fidelity, retry_of=None)
        return lambda: self._wait(keys, pending, fidelity)

    def _wait(self, keys: list[tuple[str, int | None]], pending: dict, fidelity: int | None) -> list[float]:
        values: dict[tuple[str, int | None], float] = {}
        delay, quiet_since = 0.002, time.monotonic()
        while pending:
            self._read()
            for key, assignment in list(pending.items()):
                value = self._advance(key, assignment, fidelity)
                if value is not None:
                    values[key] = value
                    del pending[key]
                    delay, quiet_since = 0.002, time.monotonic()
            if pending:
                self._check_processes()
                if time.monotonic() - quiet_since > 60:
                    running = sum(self._trials[n].state == TrialState.RUNNING
                                  for k in pending for n in self._attempts.get(k, []))
                    logger.info("waiting for workers: %d evaluations of this batch left, %d running",
                                len(pending), running)
                    quiet_since = time.monotonic()
                time.sleep(delay)
                delay = min(2 * delay, POLL)
        return [values[k] for k in keys]

    def _read(self) -> None:
        """Read the evaluations study; index the trials that are new since the last read."""
        self._trials = self.queue.get_trials(deepcopy=False)
        for trial in self._trials[self._indexed :]:
            key = _key(trial.user_attrs["assignment"], trial.user_attrs["fidelity"])
            self._attempts.setdefault(key, []).append(trial.number)
        self._indexed = len(self._trials)

    def _advance(self, key: tuple[str, int | None], assignment: Assignment, fidelity: int | None) -> float | None:
        """The evaluation's value if an attempt has it; otherwise watch its last attempt, or queue another."""
        attempts = [self._trials[n] for n in self._attempts.get(key, [])]
        for trial in attempts:
            if trial.state == TrialState.COMPLETE:
                return trial.value
            if trial.state == TrialState.FAIL and "value" in trial.user_attrs:
                return float(trial.user_attrs["value"])
        last = attempts[-1]  # `submit` queued one
        if last.state == TrialState.RUNNING and self._silent(last):
            try:
                self._store.set_trial_state_values(self._trial_id(last), TrialState.FAIL)
                logger.warning("evaluation %d: no heartbeat from worker %s for %g s; giving it up",
                               last.number, last.user_attrs.get("worker", "(unknown)"), self.grace)
            except UpdateFinishedTrialError:
                pass  # the worker finished it meanwhile: the next read has its result
        elif last.state == TrialState.FAIL:
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            why = last.user_attrs.get("error", "its worker was lost")
            if failures > self.retries:
                raise RuntimeError(f"evaluation {last.number} of study {self.queue.study_name!r} failed "
                                   f"{failures} times; the last time: {why}")
            logger.warning("evaluation %d failed (%s); queueing it again", last.number, why)
            self._enqueue(assignment, fidelity, retry_of=last.number)
        return None

    def _enqueue(self, assignment: Assignment, fidelity: int | None, retry_of: int | None) -> None:
        # The next `_read` indexes the new trial before `_advance` looks at this key again.
        attrs = {"assignment": assignment, "fidelity": fidelity}
        self.queue.enqueue_trial({}, user_attrs=attrs if retry_of is None else {**attrs, "retry_of": retry_of})

    def _silent(self, trial: FrozenTrial) -> bool:
        """Whether the trial's heartbeat has stayed the same for `grace` seconds of this clock."""
        beat, now = trial.system_attrs.get("heartbeat"), time.monotonic()
        seen = self._beats.get(trial.number)
        if seen is None or seen[0] != beat:
            self._beats[trial.number] = (beat, now)
            return False
        return now - seen[1] > self.grace

    def _trial_id(self, trial: FrozenTrial) -> int:
        return self._store.get_trial_id_from_study_id_trial_number(self._study_id, trial.number)

    def _check_processes(self) -> None:
        if not self.processes:
            return
        codes = [p.poll() for p in self.processes]
        if all(code is not None for code in codes):
            raise RuntimeError(f"all {len(codes)} local workers exited (exit statuses {codes}); "
                               f"see their messages above")


def load_factory(spec: str) -> Callable[[dict, str | None], Callable]:
    """The function named by ``module:function``."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise EvosearchError(f"--fitness {spec!r}: give module:function of an importable factory ({exc})") from None


def run_worker(storage: str, study_name: str, *, factory: str = DEFAULT_FACTORY, device: str | None = None,
               wait: float = 600.0) -> int:
    """Evaluate the search's queued evaluations until it is finished or this process is told to
    stop (SIGINT, SIGTERM); returns how many this worker did.

    The fitness is ``factory(options, device)`` with the options the driver stored. A
    worker waits for the search to start, so workers and driver can start in any order, but
    not forever: it gives up (`EvosearchError`) when the study has not appeared after `wait`
    seconds, or when for `wait` seconds nothing was queued and nobody evaluated while the
    search is not finished (a mistyped ``--study``, a driver that died). For a finished
    search it returns at once, before the fitness is built: nothing is wrong, there is only
    nothing left to do. It handles SIGINT and SIGTERM, so it runs in the main thread of its process.
    """
    with _Stop() as stop:
        store = open_storage(storage)
        study_id = _wait_for_study(store, study_name, storage, wait, stop)
        if study_id is None:
            return 0
        attrs = store.get_study_user_attrs(study_id)
        if attrs.get("finished"):
            logger.info("study %r in %s is finished: nothing to evaluate (for a search resumed on it, start "
                        "workers once it runs)", study_name, storage)
            return 0
        with stop.interrupting():  # loading a model can take a while
            fitness = as_fitness(load_factory(factory)(attrs["options"], device))
        if fidelities_of(fitness) != (attrs["fidelities"] or [0]):
            raise EvosearchError(f"--fitness {factory}: the fitness' fidelities {fidelities_of(fitness)} are not "
                                 f"the search's {attrs['fidelities']}")
        multi = attrs["fidelities"] is not None

        def call(assignments, fidelity):
            return list(fitness.evaluate_batch(assignments, fidelity if multi else None))
        me = f"{socket.gethostname()}:{os.getpid()}" + (f":{device}" if device else "")
        logger.info("worker %s evaluating for study %r in %s", me, study_name, storage)
        done, delay = 0, 0.002
        idle_since, trials = time.monotonic(), store.get_n_trials(study_id)
        while not stop.requested:
            claimed = _claim(store, study_id)
            if claimed is None:
                if store.get_study_user_attrs(study_id).get("finished"):
                    logger.info("worker %s: the search is finished; %d evaluations done here", me, done)
                    return done
                if time.monotonic() - idle_since > wait:
                    # Idle is fine while the search lives: other workers evaluate, or it queues more.
                    now = store.get_n_trials(study_id)
                    if now == trials and not store.get_n_trials(study_id, TrialState.RUNNING):
                        raise EvosearchError(
                            f"--study {study_name}: its search queued nothing for {wait:g} s and has not finished "
                            f"(stopped? resume it and start workers again, or give a longer --wait)")
                    idle_since, trials = time.monotonic(), now
                time.sleep(delay)
                delay = min(2 * delay, POLL)
                continue
            delay = 0.002
            done += _evaluate(store, *claimed, call, me, attrs["heartbeat"], stop)
            idle_since, trials = time.monotonic(), store.get_n_trials(study_id)
        logger.info("worker %s stopped; %d evaluations done here", me, done)
        return done


class _Stop:
    """SIGINT and SIGTERM ask the worker to stop. During an evaluation they interrupt it (it
    is handed back); otherwise the worker stops after the storage write in progress, so
    that a write is never cut in the middle (a journal file's lock, say)."""

    def __init__(self):
        self.requested, self._interruptible = False, False

    def __enter__(self) -> _Stop:
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if self._interruptible:
            raise KeyboardInterrupt

    @contextmanager
    def interrupting(self):
        """A section that a stop interrupts (KeyboardInterrupt)."""
        if self.requested:
            raise KeyboardInterrupt
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False


def _wait_for_study(store: BaseStorage, study_name: str, storage: str, wait: float, stop: _Stop) -> int | None:
    """The id of the search's evaluations study, once the search has made it (None: told to stop)."""
    name, announced, end = evaluations_study(study_name), False, time.monotonic() + wait
    while not stop.requested:
        try:
            return store.get_study_id_from_name(name)
        except KeyError:
            if time.monotonic() > end:
                raise EvosearchError(f"--study {study_name}: no such search in {storage} after {wait:g} s; check "
                                     f"--study and --storage (the search logs both), or give a longer --wait") from None
            if not announced:
                logger.info("waiting up to %g s for the search of study %r to start in %s", wait, study_name, storage)
                announced = True
            time.sleep(min(1.0, wait))
    return None


def _claim(store: BaseStorage, study_id: int) -> tuple[FrozenTrial, int] | None:
    """Switch a WAITING evaluation to RUNNING (atomic in the storage: of workers that try one
    at once, one gets it). Each worker starts at its own place in the queue, so that they
    seldom try the same one; the queue holds one batch, whose order does not matter."""
    waiting = store.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
    start = os.getpid() % len(waiting) if waiting else 0
    for trial in waiting[start:] + waiting[:start]:
        trial_id = store.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            if store.set_trial_state_values(trial_id, TrialState.RUNNING):
                return trial, trial_id
        except UpdateFinishedTrialError:
            continue  # another worker claimed and finished it since our read
    return None


def _evaluate(store: BaseStorage, trial: FrozenTrial, trial_id: int, call, me: str, heartbeat: float,
              stop: _Stop) -> bool:
    """Evaluate one claimed trial and record the outcome; False if it was not recorded."""
    assignment, fidelity = trial.user_attrs["assignment"], trial.user_attrs["fidelity"]
    try:
        with _beating(store, trial_id, heartbeat):
            store.set_trial_user_attr(trial_id, "worker", me)
            with stop.interrupting():
                value = float(call([assignment], fidelity)[0])
    except KeyboardInterrupt:  # told to stop: hand the evaluation back
        _finish(store, trial_id, TrialState.FAIL)
        return False
    except UpdateFinishedTrialError:  # from the "worker" attribute: the driver gave it up already
        return False
    except Exception as exc:  # the fitness raised: record it and go on; the driver decides
        logger.exception("evaluation %d failed", trial.number)
        return _finish(store, trial_id, TrialState.FAIL, error=f"{type(exc).__name__}: {exc}")
    if math.isfinite(value):
        recorded = _finish(store, trial_id, TrialState.COMPLETE, values=[value])
    else:
        recorded = _finish(store, trial_id, TrialState.FAIL, value=repr(value))
    if not recorded:
        logger.warning("evaluation %d was given up by the search (no heartbeat for too long) and queued again; "
                       "this result is dropped", trial.number)
    return recorded


def _finish(store: BaseStorage, trial_id: int, state: TrialState, values: list[float] | None = None,
            **attrs: str) -> bool:
    """Set attributes, then the final state; False if the trial was finished by someone else."""
    try:
        for name, value in attrs.items():
            store.set_trial_user_attr(trial_id, name, value)
        store.set_trial_state_values(trial_id, state, values)
    except UpdateFinishedTrialError:
        return False
    return True


@contextmanager
def _beating(store: BaseStorage, trial_id: int, interval: float):
    """Write the time into the trial's ``heartbeat`` system attribute every `interval` seconds."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                store.set_trial_system_attr(trial_id, "heartbeat", time.time())
            except UpdateFinishedTrialError:
                return  # the driver gave this evaluation up
            except Exception as exc:  # the storage is unreachable for now: the next beat tries again
                logger.warning("heartbeat not recorded: %s", exc)

    thread = threading.Thread(target=beat, name="evosearch-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
