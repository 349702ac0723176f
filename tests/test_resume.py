"""Kill a search mid-way (SIGINT, or SIGKILL), resume it, and get what an uninterrupted run gets."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from evosearch import EvosearchError, search
from evosearch.testing import evopress_shaped

ROOT = Path(__file__).parent.parent

# Runs a multi-fidelity EvoPress search; the fitness logs each call to a file and, at
# call KILL_AT, sends the process the signal KILL_WITH (the call in flight is lost).
SCRIPT = textwrap.dedent(
    """
    import json, logging, os, signal, sys
    from evosearch import search
    from evosearch.engine import FunctionFitness
    from evosearch.testing import evopress_shaped

    storage, log, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
    kill_at, kill_with = int(os.environ.get("KILL_AT", 0)), os.environ.get("KILL_WITH", "SIGINT")
    problem = evopress_shaped({"attn": (8, 1), "mlp": (8, 2)}, seed=5)
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits SIGINT ignored

    def fitness(assignment, fidelity):
        with open(log, "a") as f:
            f.write(f"{fidelity}\\n")
        calls = sum(1 for _ in open(log))
        if calls == kill_at:
            os.kill(os.getpid(), getattr(signal, kill_with))
        return problem.fitness(assignment) * (1 + (hash(json.dumps(assignment, sort_keys=True)) % 97) / (97 * fidelity))

    options = {"offspring": 10, "generations": 12, "stages": [(1, 3), (8, 1)]}
    result = search(problem.space, FunctionFitness(fitness, fidelities=[1, 8]), problem.budget, seed=3, storage=storage or None,
                    study_name="resume-test", resume=resume, sampler_options=options, progress=False)
    print(json.dumps({"best": result.best.assignment, "value": result.best.value, "n": result.n_evaluations}))
    """
)


def run(tmp_path, storage, mode, kill_at=0, kill_with="SIGINT"):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_AT": str(kill_at), "KILL_WITH": kill_with, "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, storage, str(tmp_path / "calls.log"), mode],
        env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    done = run(tmp, "", "fresh")
    assert done.returncode == 0, done.stderr
    return done.stdout, sum(1 for _ in open(tmp / "calls.log"))


@pytest.mark.parametrize(
    "storage, kill_with",
    [("sqlite:///{}/search.db", "SIGINT"), ("{}/search.journal", "SIGINT"), ("sqlite:///{}/search.db", "SIGKILL")],
)
def test_killed_search_resumes_to_the_same_best(tmp_path, uninterrupted, storage, kill_with):
    expected, calls = uninterrupted
    storage = storage.format(tmp_path)
    killed = run(tmp_path, storage, "fresh", kill_at=calls // 2, kill_with=kill_with)
    assert killed.returncode != 0
    if kill_with == "SIGINT":
        assert "resume=True" in killed.stderr  # the log says how to go on
    resumed = run(tmp_path, storage, "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == expected
    # The evaluation in flight when the signal came is the only one spent twice.
    assert sum(1 for _ in open(tmp_path / "calls.log")) == calls + 1


def test_resume_refuses_other_settings_and_fresh_runs_refuse_existing_studies(tmp_path):
    problem = evopress_shaped({"blocks": (8, 1)})
    storage = f"sqlite:///{tmp_path}/s.db"
    args = (problem.space, problem.fitness, problem.budget)
    options = {"offspring": 4, "generations": 2}
    first = search(*args, storage=storage, study_name="s", sampler_options=options, progress=False)
    with pytest.raises(EvosearchError, match="already has .* trials.*pass resume=True"):
        first = search(*args, storage=storage, study_name="s", sampler_options=options, progress=False)
    with pytest.raises(EvosearchError, match="cannot resume study 's': it was run with seed=0, this call has seed=1"):
        search(*args, storage=storage, study_name="s", seed=1, resume=True, sampler_options=options, progress=False)
    # Resuming a finished search replays it from storage without a single new evaluation.
    calls = []
    again = search(
        problem.space, lambda a: calls.append(a) or problem.fitness(a), problem.budget,
        storage=storage, study_name="s", resume=True, sampler_options=options, progress=False,
    )
    assert calls == [] and again.best == first.best


def test_optuna_sampler_resume_continues_the_study(tmp_path):
    problem = evopress_shaped({"blocks": (8, 1)})
    storage = f"{tmp_path}/tpe.log"
    first = search(problem.space, problem.fitness, problem.budget, sampler="tpe", n_trials=10, storage=storage, progress=False)
    second = search(
        problem.space, problem.fitness, problem.budget, sampler="tpe", n_trials=25, storage=storage, resume=True, progress=False
    )
    assert len(first.trials) == 10 and len(second.trials) == 25
    assert second.best.value <= first.best.value


def test_pruned_trials_have_no_value_and_keep_their_reports(tmp_path):
    """Optuna's tell would make a pruned trial's last report its value: optuna-dashboard then plots a
    candidate dropped on few tokens as better than the best."""
    import optuna
    from optuna.trial import TrialState

    from evosearch.engine import FunctionFitness
    from evosearch.workers import open_storage

    problem = evopress_shaped({"attn": (8, 1), "mlp": (8, 2)}, seed=5)
    calls = []

    def fitness(assignment, fidelity):
        calls.append(fidelity)
        return problem.fitness(assignment) * (1 + 1 / fidelity)  # scored on fewer tokens, it looks better

    fitness = FunctionFitness(fitness, fidelities=[1, 8])
    storage = str(tmp_path / "s.journal")
    args = dict(seed=3, storage=storage, study_name="s", progress=False,
                sampler_options={"offspring": 6, "generations": 3, "stages": [(1, 2), (8, 1)]})
    first = search(problem.space, fitness, problem.budget, n_trials=25, **args)
    assert first.n_evaluations == 25  # stopped in a generation: its open trials were closed PRUNED too
    trials = optuna.load_study(study_name="s", storage=open_storage(storage)).get_trials()
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert len(pruned) > 6 and all(t.value is None and t.intermediate_values for t in pruned)
    assert all(t.value is not None for t in trials if t.state == TrialState.COMPLETE)
    # Resume replays from the reports: not one evaluation again, the same answer.
    done = len(calls)
    again = search(problem.space, fitness, problem.budget, n_trials=25, resume=True, **args)
    assert len(calls) == done and again.best == first.best and again.n_evaluations == first.n_evaluations


def test_a_resume_may_run_more_generations(tmp_path):
    """Each generation draws from a stream of its own, so a run of 2 generations resumed for 4 is a run of 4."""
    problem = evopress_shaped({"blocks": (8, 1)})
    args = (problem.space, problem.fitness, problem.budget)
    storage = str(tmp_path / "s.journal")
    options = {"offspring": 4}
    search(*args, storage=storage, study_name="s", sampler_options=options | {"generations": 2}, progress=False)
    longer = search(*args, storage=storage, study_name="s", resume=True, sampler_options=options | {"generations": 4},
                    progress=False)
    once = search(*args, sampler_options=options | {"generations": 4}, progress=False)
    assert (longer.best, longer.n_evaluations) == (once.best, once.n_evaluations)
    with pytest.raises(EvosearchError, match="it was run with sampler_options={'offspring': 4, 'generations': 2}"):
        search(*args, storage=storage, study_name="s", resume=True, sampler_options={"offspring": 5}, progress=False)
