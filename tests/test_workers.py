"""A search on worker processes that share only its Optuna storage (a journal file, PostgreSQL).

Every fitness call is logged (tests/workers_fitness.py), so a test can count them: each
evaluation of the search is one COMPLETE trial of the evaluations study, and a call that
did not end in one belongs to a FAIL trial (a worker killed or stopped in the middle).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evosearch import EvosearchError, search
from evosearch.cli import main
from evosearch.testing import slow_fitness
from evosearch.workers import Workers, evaluations_study, open_storage, run_worker

ROOT = Path(__file__).parent.parent
PROBLEM = {"problem": "evopress_shaped", "args": {"groups": {"attn": [8, 1], "mlp": [8, 2]}, "seed": 5},
           "fidelities": [1, 8], "delay": 0.03}
EVOPRESS = {"offspring": 10, "generations": 4, "stages": [[1, 3], [8, 1]]}
FAST = {"heartbeat": 0.25, "grace": 3.0}  # lost workers are noticed in seconds

# The driver as a process of its own, to be killed: args storage, study, log, "local" or "remote".
DRIVER = textwrap.dedent(
    """
    import json, logging, sys
    from evosearch import search
    from evosearch.testing import slow_fitness
    from evosearch.workers import Workers

    storage, study, log, mode = sys.argv[1:5]
    problem, options = json.loads(sys.argv[5]), json.loads(sys.argv[6])
    logging.basicConfig(level=logging.INFO)
    fitness = slow_fitness(problem)
    with Workers(storage, study, count=2, options={**problem, "log": log}, fidelities=problem["fidelities"],
                 factory="workers_fitness:fitness", local=mode == "local", heartbeat=0.25, grace=3.0) as workers:
        search(fitness.problem.space, workers, fitness.problem.budget, seed=3, storage=storage, study_name=study,
               sampler_options=options, progress=False)
    """
)


@pytest.fixture(autouse=True)
def importable(monkeypatch):
    """Worker processes import evosearch and the tests' fitness from this checkout."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "tests")]))


def postgres() -> str:
    url = os.environ.get("EVOSEARCH_TEST_POSTGRES")
    if not url:
        pytest.skip("EVOSEARCH_TEST_POSTGRES is unset: give it a postgresql:// URL of a database to run the "
                    "PostgreSQL tests (.ci/run starts a server)")
    return url


@pytest.fixture(params=["journal", "postgres"])
def storage(request, tmp_path):
    return str(tmp_path / "search.journal") if request.param == "journal" else postgres()


@pytest.fixture
def study(storage):
    """A fresh study name; its studies are deleted afterwards (they outlive the test in PostgreSQL)."""
    name = f"workers-{uuid.uuid4().hex[:8]}"
    yield name
    store = open_storage(storage)
    for existing in (name, evaluations_study(name)):
        if existing in {s.study_name for s in store.get_all_studies()}:
            optuna.delete_study(study_name=existing, storage=store)


def run(storage, study, log, count, resume=False, **options):
    fitness = slow_fitness(PROBLEM)
    with Workers(storage, study, count=count, options={**PROBLEM, "log": str(log), **options},
                 fidelities=PROBLEM["fidelities"], factory="workers_fitness:fitness", **FAST) as workers:
        result = search(fitness.problem.space, workers, fitness.problem.budget, seed=3, storage=storage,
                        study_name=study, resume=resume, sampler_options=EVOPRESS, progress=False)
    return result, workers


def calls(log) -> int:
    return sum(1 for _ in open(log))


def evaluations(storage, study) -> list[optuna.trial.FrozenTrial]:
    store = open_storage(storage)
    return optuna.load_study(study_name=evaluations_study(study), storage=store).get_trials()


def states(trials) -> dict[str, int]:
    return {state.name: sum(t.state == state for t in trials) for state in TrialState if any(t.state == state for t in trials)}


def assert_same_search(result, reference):
    assert result.best == reference.best and result.n_evaluations == reference.n_evaluations
    trajectory = lambda r: [(t.number, t.state, t.assignment, t.value, t.reports) for t in r.trials]  # noqa: E731
    assert trajectory(result) == trajectory(reference)


def assert_same_answer(resumed, reference):
    """What test_resume asks of a resumed search (its trial numbers differ: the dead run's stay FAIL)."""
    best, expected = resumed.best, reference.best
    assert (best.assignment, best.value, resumed.n_evaluations) == (expected.assignment, expected.value,
                                                                    reference.n_evaluations)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The search on one worker."""
    tmp = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
        result, _ = run(str(tmp / "search.journal"), "reference", tmp / "calls.log", count=1)
    assert calls(tmp / "calls.log") == result.n_evaluations  # each evaluation once
    return result


def test_three_workers_find_what_one_finds(storage, study, reference, tmp_path):
    result, workers = run(storage, study, tmp_path / "calls.log", count=3)
    assert_same_search(result, reference)
    trials = evaluations(storage, study)
    assert states(trials) == {"COMPLETE": result.n_evaluations}
    assert calls(tmp_path / "calls.log") == result.n_evaluations
    assert len({t.user_attrs["worker"] for t in trials}) > 1  # the work was spread
    assert [p.returncode for p in workers.processes] == [0, 0, 0]  # all exited when the search finished


def test_a_worker_killed_mid_evaluation_is_replaced(storage, study, reference, tmp_path):
    result, workers = run(storage, study, tmp_path / "calls.log", count=3, kill_at=20)
    assert_same_search(result, reference)
    trials = evaluations(storage, study)
    assert states(trials) == {"COMPLETE": result.n_evaluations, "FAIL": 1}
    lost = next(t for t in trials if t.state == TrialState.FAIL)
    assert set(lost.user_attrs) == {"assignment", "fidelity", "worker"}  # no value, no error: its worker was lost
    retry = [t for t in trials if t.user_attrs.get("retry_of") == lost.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert (retry[0].user_attrs["assignment"], retry[0].user_attrs["fidelity"]) == (
        lost.user_attrs["assignment"], lost.user_attrs["fidelity"])
    assert calls(tmp_path / "calls.log") == result.n_evaluations + 1  # the killed call, and nothing else, twice
    assert sorted(p.returncode for p in workers.processes) == [-signal.SIGKILL, 0, 0]


def test_ctrl_c_stops_driver_and_workers_and_the_search_resumes(reference, tmp_path):
    storage, log = str(tmp_path / "search.journal"), tmp_path / "calls.log"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, storage, "s", str(log), "local", json.dumps(PROBLEM),
                               json.dumps(EVOPRESS)], start_new_session=True)  # a process group, like a terminal's job
    wait_for_calls(log, 20, driver)
    os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C does
    assert driver.wait(timeout=60) != 0
    with pytest.raises(ProcessLookupError):
        os.killpg(driver.pid, 0)  # the driver and both workers are gone
    result, _ = run(storage, "s", log, count=2, resume=True)
    assert_same_answer(result, reference)
    trials = evaluations(storage, "s")
    assert sum(t.state == TrialState.COMPLETE for t in trials) == result.n_evaluations
    assert result.n_evaluations <= calls(log) <= result.n_evaluations + sum(t.state == TrialState.FAIL for t in trials)


def test_a_killed_driver_resumes_without_redoing_an_evaluation(reference, tmp_path):
    storage, study, log = str(tmp_path / "search.journal"), "s", tmp_path / "calls.log"
    workers = [subprocess.Popen([sys.executable, "-m", "evosearch", "worker", "--storage", storage, "--study", study,
                                 "--fitness", "workers_fitness:fitness"]) for _ in range(2)]
    try:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, storage, study, str(log), "remote", json.dumps(PROBLEM),
                                   json.dumps(EVOPRESS)])
        wait_for_calls(log, 20, driver)
        driver.kill()
        driver.wait()
        fitness = slow_fitness(PROBLEM)
        with Workers(storage, study, count=2, options={**PROBLEM, "log": str(log)}, fidelities=PROBLEM["fidelities"],
                     local=False, **FAST) as remote:
            result = search(fitness.problem.space, remote, fitness.problem.budget, seed=3, storage=storage,
                            study_name=study, resume=True, sampler_options=EVOPRESS, progress=False)
        assert [w.wait(timeout=60) for w in workers] == [0, 0]  # the finished search let them go
    finally:
        for worker in workers:
            worker.kill()
    assert_same_answer(result, reference)
    # What the workers finished while no driver was there was taken, not evaluated again.
    assert states(evaluations(storage, study)) == {"COMPLETE": result.n_evaluations}
    assert calls(log) == result.n_evaluations


def test_optuna_samplers_ask_a_trial_per_worker(tmp_path):
    single = {**PROBLEM, "fidelities": None, "delay": 0.0}
    fitness = slow_fitness(single)
    problem, options = fitness.problem, {"n_startup_trials": 3}

    class ThreeAtOnce:
        parallelism = 3

        def evaluate_batch(self, assignments, fidelity):
            return [fitness(a) for a in assignments]

    args = dict(sampler="tpe", n_trials=14, seed=1, sampler_options=options, progress=False)
    alone = search(problem.space, ThreeAtOnce(), problem.budget, storage=str(tmp_path / "alone.journal"), **args)
    storage = str(tmp_path / "workers.journal")
    with Workers(storage, "tpe", count=3, options={**single, "log": str(tmp_path / "calls.log")},
                 factory="workers_fitness:fitness", **FAST) as workers:
        result = search(problem.space, workers, problem.budget, storage=storage, study_name="tpe", **args)
    assert [t.state for t in result.trials] == ["COMPLETE"] * 14
    # Asked three at a time: the third trial started before the first was told.
    trials = optuna.load_study(study_name="tpe", storage=open_storage(storage)).get_trials()
    assert trials[2].datetime_start < trials[0].datetime_complete < trials[3].datetime_start
    # What the batch of asks gives depends on the number of workers, not on their timing.
    assert [(t.assignment, t.value) for t in result.trials] == [(t.assignment, t.value) for t in alone.trials]


def test_a_fitness_that_keeps_raising_stops_the_search(tmp_path):
    storage, log = str(tmp_path / "search.journal"), tmp_path / "calls.log"
    fitness = slow_fitness(PROBLEM)
    with pytest.raises(RuntimeError, match="failed 2 times; the last time: ValueError: no value at fidelity 8") as raised:
        with Workers(storage, "s", count=1, options={**PROBLEM, "log": str(log), "raise_at": 8},
                     fidelities=PROBLEM["fidelities"], factory="workers_fitness:fitness", retries=1, **FAST) as workers:
            search(fitness.problem.space, workers, fitness.problem.budget, storage=storage, study_name="s",
                   sampler_options=EVOPRESS, progress=False)
    # The evaluation that stopped the search was tried twice (retries=1): an attempt and its retry.
    trials = evaluations(storage, "s")
    last = int(str(raised.value).split()[1])
    first = trials[last].user_attrs["retry_of"]
    assert [trials[n].user_attrs["error"] for n in (first, last)] == ["ValueError: no value at fidelity 8"] * 2
    assert "retry_of" not in trials[first].user_attrs
    assert workers.processes[0].returncode == 0  # stopped with the search


def test_bad_setups_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(EvosearchError, match="SQLite is a storage for one process"):
        open_storage(f"sqlite:///{tmp_path}/s.db")
    storage = str(tmp_path / "s.journal")
    Workers(storage, "s", count=2, options={**PROBLEM, "fidelities": None}, fidelities=[1, 8])
    with pytest.raises(EvosearchError, match=r"fidelities \[0\] are not the search's \[1, 8\]"):
        run_worker(storage, "s", factory="evosearch.testing:slow_fitness")  # builds a single-fidelity one
    with pytest.raises(EvosearchError, match="give module:function"):
        run_worker(storage, "s", factory="evosearch.testing:no_such_factory")
    assert main(["search", "sparsity", "--budget", "0.5", "--workers", "2", "--out", str(tmp_path / "o")]) == 2
    assert "--workers needs --storage" in capsys.readouterr().err


def test_a_worker_waits_for_a_search_but_not_forever(tmp_path, capsys):
    storage = str(tmp_path / "s.journal")
    worker = ["worker", "--storage", storage, "--fitness", "evosearch.testing:slow_fitness", "--wait", "0.5"]
    started = time.monotonic()
    assert main([*worker, "--study", "typo"]) == 2  # no such study
    err = capsys.readouterr().err.splitlines()
    assert err == [f"[evosearch worker {os.getpid()}] waiting up to 0.5 s for the search of study 'typo' to start in "
                   f"{storage}", f"evosearch: error: --study typo: no such search in {storage} after 0.5 s; check "
                   f"--study and --storage (the search logs both), or give a longer --wait"]
    # A search that started, then queued nothing (its driver died, say): given up after --wait too.
    with Workers(storage, "idle", count=1, options=PROBLEM, fidelities=PROBLEM["fidelities"], local=False):
        assert main([*worker, "--study", "idle"]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            "evosearch: error: --study idle: its search queued nothing for 0.5 s and has not finished (stopped? "
            "resume it and start workers again, or give a longer --wait)")
    # A finished search: nothing to do, said at once, and no fitness is built (this factory would fail).
    assert main([*worker[:-4], "--fitness", "no.such:factory", "--study", "idle"]) == 0
    assert "study 'idle' in " + storage + " is finished: nothing to evaluate" in capsys.readouterr().err
    assert time.monotonic() - started < 20
    assert main([*worker[:-1], "0", "--study", "idle"]) == 2
    assert "--wait must be a positive number of seconds, got 0" in capsys.readouterr().err


NO_SERVER = "postgresql://nobody@127.0.0.1:1/x"  # nothing listens on port 1
UNREACHABLE = ("storage: cannot reach the database server at postgresql://nobody@127.0.0.1:1/x (connection failed: "
               "connection to server at \"127.0.0.1\", port 1 failed: Connection refused); check the URL, or start "
               "the server")


@pytest.mark.parametrize("argv, message", [
    (["search", "sparsity", "--budget", "0.5", "--storage", NO_SERVER, "--out", "{tmp}/run"], UNREACHABLE),
    (["search", "sparsity", "--budget", "0.5", "--storage", NO_SERVER, "--out", "{tmp}/old", "--force"], UNREACHABLE),
    (["search", "sparsity", "--budget", "0.5", "--storage", NO_SERVER, "--workers", "2", "--out", "{tmp}/run"],
     UNREACHABLE),
    (["worker", "--storage", NO_SERVER, "--study", "S"], UNREACHABLE),
    (["worker", "--storage", "{tmp}/missing/folder/study.journal", "--study", "S"],
     "storage {tmp}/missing/folder/study.journal: cannot open the journal file (its folder {tmp}/missing/folder does "
     "not exist); check the path"),
])
def test_a_storage_out_of_reach_is_one_line_before_anything_is_loaded(tmp_path, capsys, argv, message):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "result.json").write_text("{}")  # --force deletes nothing before the storage is reached
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert capsys.readouterr().err == f"evosearch: error: {message.format(tmp=tmp_path)}\n"  # no model was loaded
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["old", "result.json"]


def wait_for_calls(log, n, driver, timeout=120.0):
    """Until the fitness has been called `n` times, while the driver runs."""
    end = time.monotonic() + timeout
    while not (log.exists() and calls(log) >= n):
        assert driver.poll() is None and time.monotonic() < end
        time.sleep(0.05)
