"""Whole runs on a tiny checkpoint: recipes repeat them, `show` reads them finished or interrupted, `report` draws them."""

from __future__ import annotations

import json
import os
import shlex
import shutil

import pytest
import yaml

from evosearch.cli import main
from evosearch.errors import EvosearchError
from evosearch.pipeline import SearchSettings, run_search
from evosearch.recipe import Recipe
from evosearch.report import allocation, summarize, write_report
from evosearch.space import Space, Unit


def settings(checkpoint, **changes) -> SearchSettings:
    model, corpus = checkpoint
    base = dict(space="sparsity", budget=0.5, model=str(model), corpus=str(corpus), sampler_options={"offspring": 4},
                generations=3, sequence_length=64, calibration_sequences=4, fidelities=[64, 128], eval_tokens=1024,
                device="cpu")
    return SearchSettings(**base | changes)


@pytest.fixture(scope="module")
def finished(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    run_search(settings(checkpoint), out, progress=False)
    return out


def test_result_records_a_recipe_that_repeats_the_run(finished, tmp_path, capsys):
    result = json.loads((finished / "result.json").read_text())
    assert Recipe.load(finished / "recipe.yaml").model_dump(mode="json") == result["recipe"]

    assert main(["show", str(finished), "--recipe"]) == 0
    (tmp_path / "recipe.yaml").write_text(capsys.readouterr().out)
    assert main(["run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "result.json").read_text())
    assert again["assignment"] == result["assignment"]
    assert again["fitness"]["kl"] == pytest.approx(result["fitness"]["kl"], rel=1e-6)
    assert again["recipe"] == result["recipe"] | {"out": str(tmp_path / "again")}

    assert main(["run", str(finished / "result.json")]) == 2  # its own folder is finished: --force or --out
    assert "already holds a finished search" in capsys.readouterr().err


def test_show_a_finished_search(finished, capsys):
    assert main(["show", str(finished)]) == 0
    text = capsys.readouterr().out
    assert f"{finished}: finished sparsity search with evopress" in text
    assert "perplexity (" in text and "KL to dense" in text
    assert "q_proj" in text and "down_proj" in text and "resume" not in text

    assert main(["show", str(finished), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    result = json.loads((finished / "result.json").read_text())
    assert summary["status"] == "finished" and summary["result"] == result
    assert summary["study"]["evaluations"] == result["search"]["evaluations"]
    assert summary["study"]["best"]["trial"] == result["search"]["best_trial"]
    assert summary["study"]["pareto"] == []  # single objective
    grid = summary["allocation"]
    assert grid["resource"] == "sparsity" and grid["layers"] == [0, 1]
    assert grid["rows"] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    space = Space.from_yaml(finished / "space.yaml")
    unit = space.unit("model.layers.1.mlp.up_proj")
    level = result["assignment"][unit.name]
    assert grid["values"][5][1] == unit.resources["sparsity"][unit.levels.index(level)]


def test_show_is_robust_to_sections_it_does_not_know(finished, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    result = json.loads((finished / "result.json").read_text())
    result["reformed"] = {"model.layers.0.mlp": {"error_before": 1.0, "error_after": 0.5}}
    del result["baselines"], result["timings"]
    (folder / "result.json").write_text(json.dumps(result))  # no study, no space.yaml: a copied result.json
    assert main(["show", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "also in result.json: reformed" in text
    assert "level per unit" in text  # without space.yaml, levels stand for themselves


def test_show_an_interrupted_search_and_resume_it(checkpoint, finished, tmp_path, monkeypatch, capsys):
    from evosearch.fitness import KLFitness

    calls, evaluate = [], KLFitness.evaluate_batch

    def interrupted(self, assignments, fidelity=None):  # the engine scores candidates in batches
        if len(calls) >= 9:
            raise KeyboardInterrupt
        calls.extend([fidelity] * len(assignments))
        return evaluate(self, assignments, fidelity)

    monkeypatch.setattr(KLFitness, "evaluate_batch", interrupted)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_search(settings(checkpoint), out, progress=False)
    monkeypatch.setattr(KLFitness, "evaluate_batch", evaluate)
    assert not (out / "result.json").exists()

    assert main(["show", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "interrupted" and summary["result"] is None
    assert summary["study"]["evaluations"] == len(calls) >= 9  # every finished batch is stored
    best = summary["study"]["best"]
    assert best["fidelity"] == 128 and best["usage"]["average sparsity"] == pytest.approx(0.5)
    assert summary["allocation"]["layers"] == [0, 1]
    assert summary["study"]["runs"] == 1 and summary["study"]["seconds"] > 0  # the interrupted run counts

    with pytest.raises(EvosearchError, match="already holds an interrupted search"):
        run_search(settings(checkpoint), out, progress=False)  # not without --resume
    with pytest.raises(EvosearchError, match="was searched with sampler_options"):  # refused, and change nothing
        run_search(settings(checkpoint, sampler_options={"offspring": 5}), out, resume=True, progress=False)
    assert Recipe.load(out / "recipe.yaml") == Recipe.from_settings(settings(checkpoint), out)

    assert main(["show", str(out)]) == 0
    text = capsys.readouterr().out
    assert "interrupted sparsity search with evopress" in text and "best feasible candidate so far" in text
    resume = next(line for line in text.splitlines() if line.startswith("resume: "))[len("resume: "):]
    assert main(shlex.split(resume)[1:]) == 0  # "evosearch run DIR/recipe.yaml --out DIR --resume"
    resumed = json.loads((out / "result.json").read_text())
    assert resumed["assignment"] == json.loads((finished / "result.json").read_text())["assignment"]
    # Its search time is that of both runs, not only the last's.
    assert resumed["search"]["runs"] == 2 and resumed["search"]["seconds"] >= summary["study"]["seconds"]
    study = summarize(out)["study"]
    assert study["runs"] == 2 and resumed["search"]["seconds"] == study["seconds"]  # the sum the study recorded
    assert main(["show", str(out)]) == 0
    assert f"{resumed['search']['seconds']:.0f} s over 2 runs (the last run's seconds per stage" in capsys.readouterr().out


def test_report_writes_plots_and_one_page(finished):
    written = write_report(finished)
    names = sorted(p.name for p in written)
    assert names == ["allocation.png", "convergence.png", "report.html", "report.md"]
    for png in ("allocation.png", "convergence.png"):
        assert (finished / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (finished / "report.md").read_text()
    assert "![allocation](allocation.png)" in page and "![convergence](convergence.png)" in page
    assert "| perplexity (" in page and "evosearch run" in page
    recipe = next(block for block in page.split("```\n") if block.startswith("# evosearch recipe"))
    assert Recipe.model_validate(yaml.safe_load(recipe)) == Recipe.load(finished / "recipe.yaml")
    html = (finished / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2


def test_report_compares_samplers_on_the_same_problem(checkpoint, finished, tmp_path):
    # The space's sampler defaults (offspring) are EvoPress's: other samplers run on the ready space without them.
    out = tmp_path / "random"
    run_search(settings(checkpoint, sampler="random", sampler_options={}, generations=None, trials=4), out,
               progress=False)
    assert summarize(out)["study"]["sampler"] == "random"
    written = write_report(finished, compare=[out])
    assert f"| {out} | random |" in (finished / "report.md").read_text()
    assert finished / "convergence.png" in written


def test_multi_objective_search_reports_its_pareto_set(checkpoint, tmp_path):
    space_file = tmp_path / "2of4-max.yaml"
    space_file.write_text(yaml.safe_dump({
        "name": "2of4-max", "compression": {"kind": "sparsity", "method": "magnitude", "levels": [0.0, "2:4"]},
        "budget": {"resource": "sparsity", "form": "max_average"}, "baselines": []}))
    out = tmp_path / "nsga2"
    run_search(settings(checkpoint, space=str(space_file), sampler="nsga2", generations=None, trials=12,
                        sampler_options={"direction": "maximize", "population_size": 4}, fidelities=[128]),
               out, progress=False)
    summary = summarize(out)
    pareto = summary["study"]["pareto"]
    assert summary["study"]["tradeoff"] == {"label": "average sparsity", "direction": "maximize"}
    assert len(pareto) >= 2
    for p in pareto:  # nothing is both closer to the dense model and sparser
        assert not any(q["value"] <= p["value"] and q["tradeoff"] >= p["tradeoff"] and q != p for q in pareto)
    recorded = summary["result"]["search"]["pareto"]  # the engine's own Pareto set, in result.json
    assert {(p["value"], p["tradeoff"]) for p in pareto} == {(p["kl"], p["usage"]["max_average sparsity"])
                                                           for p in recorded}
    assert "pareto.png" in [p.name for p in write_report(out)]


def test_allocation_of_spaces_it_does_not_know():
    space = Space(units=[
        *(Unit(name=f"model.layers.{i}.mlp", levels=["keep", "drop"], resources={"dropped": [0, 1]}) for i in range(3)),
        *(Unit(name=f"model.layers.{i}.self_attn.q_proj", levels=[2, 3, 4], resources={"bits": [2, 3, 4.25]})
          for i in range(2)),
        Unit(name="lm_head", levels=[4, 8], resources={"bits": [4, 8]}),
    ])
    assignment = {"model.layers.0.mlp": "keep", "model.layers.1.mlp": "drop", "model.layers.2.mlp": "keep",
                  "model.layers.0.self_attn.q_proj": 4, "model.layers.1.self_attn.q_proj": 2, "lm_head": 8}
    dropped = allocation(assignment, space, "dropped")
    assert dropped["rows"] == ["mlp", "self_attn.q_proj"] and dropped["layers"] == [0, 1, 2]
    assert dropped["values"][0] == [0, 1, 0] and dropped["labels"][0] == ["keep", "drop", "keep"]
    assert dropped["values"][1] == [4, 2, None]  # no 'dropped' resource: the level stands for itself
    assert dropped["other"] == {"lm_head": "8"}
    bits = allocation(assignment, space, "bits")
    assert bits["values"][1] == [4.25, 2, None] and bits["labels"][1] == ["4.25", "2", None]


def test_recipe_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: sparsity\nbudget: 0.5\nbudgt: 0.6\n")
    with pytest.raises(EvosearchError, match=r"bad.yaml: budgt: unknown field; the fields are space, budget"):
        Recipe.load(bad)
    bad.write_text("space: sparsity\nbudgt: 0.5\n")  # the typo, not the budget it leaves missing
    with pytest.raises(EvosearchError, match=r"bad.yaml: budgt: unknown field; the fields are space, budget"):
        Recipe.load(bad)
    bad.write_text("space: sparsity\n")
    with pytest.raises(EvosearchError, match=r"bad.yaml: budget: Field required"):
        Recipe.load(bad)
    bad.write_text("space: [sparsity\n")
    with pytest.raises(EvosearchError, match=r"bad.yaml is not valid YAML"):
        Recipe.load(bad)
    with pytest.raises(EvosearchError, match="cannot read it"):
        Recipe.load(tmp_path / "missing.yaml")
    recipe = Recipe(space="drop", budget=0.25, sampler="nsga2", trials=20,
                    sampler_options={"direction": "maximize"}, out="x")
    bad.write_text(recipe.to_yaml())
    assert Recipe.load(bad) == recipe and recipe.settings == SearchSettings(**recipe.model_dump(exclude={"out"}))


def test_resume_is_checked_against_the_folder_before_anything_is_loaded(checkpoint, finished, tmp_path, monkeypatch,
                                                                        capsys):
    from evosearch import pipeline

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    load_model = pipeline.load_model

    def nothing_is_loaded(*args, **kwargs):
        raise AssertionError("a refused resume loaded the model")

    monkeypatch.setattr(pipeline, "load_model", nothing_is_loaded)
    for change, message in [
        (dict(budget=0.6), "budget 0.5, this command has 0.6; use the same --budget or a new --out"),
        (dict(sequence_length=32), "sequence_length 64, this command has 32; use the same --sequence-length or a "
                                   "new --out"),
        (dict(storage=str(tmp_path / "other.journal")), f"storage {out.resolve()}/study.journal, this command has "
                                                        f"{tmp_path}/other.journal; use the same --storage or a new --out"),
        (dict(sampler_options={"offspring": 5}), 'sampler_options {"offspring": 4}, this command has {"offspring": 5}; '
                                                 'use the same sampler options (--offspring, recipe sampler_options)'),
    ]:
        with pytest.raises(EvosearchError) as refused:
            run_search(settings(checkpoint, **change), out, resume=True, progress=False)
        assert str(refused.value).startswith(f"--resume: {out} was searched with {message}")
    recipe = yaml.safe_load((out / "recipe.yaml").read_text()) | {"budget": 0.6}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "other.yaml"), "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err == (f"evosearch: error: --resume: {out} was searched with budget 0.5, this command "
                                       f"has 0.6; use the same --budget or a new --out\n")

    # What only says how long, where or beside what it runs may change: here, run longer.
    monkeypatch.setattr(pipeline, "load_model", load_model)
    before = json.loads((out / "result.json").read_text())
    longer = run_search(settings(checkpoint, generations=5, baselines=[], compile=False,
                                 storage=os.path.relpath(out / "study.journal")), out, resume=True, progress=False)
    assert longer.search.evaluations > before["search"]["evaluations"] and longer.search.runs == 2


def test_a_run_that_evaluated_nothing_is_started_again(checkpoint, tmp_path, monkeypatch, caplog, capsys):
    import optuna

    from evosearch import pipeline

    out = tmp_path / "run"
    with pytest.raises(EvosearchError, match="--resume and --force: pass one"):
        run_search(settings(checkpoint), out, resume=True, force=True, progress=False)
    assert main(["search", "sparsity", "--budget", "0.5", "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err == (f"evosearch: error: --out {out} holds no search to resume (there is no such "
                                       f"folder); drop --resume to start one\n")
    assert not out.exists()

    load_model = pipeline.load_model

    def broken(*args, **kwargs):
        raise ImportError("cannot import name 'LlamaForCausalLM'")

    monkeypatch.setattr(pipeline, "load_model", broken)
    with pytest.raises(ImportError):
        run_search(settings(checkpoint), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "recipe.yaml"]
    with pytest.raises(EvosearchError, match=f"^--out {out} holds no search to resume; drop --resume to start one$"):
        run_search(settings(checkpoint), out, resume=True, progress=False)
    monkeypatch.setattr(pipeline, "load_model", load_model)
    optuna.create_study(storage=pipeline._storage(str(out / "study.journal")), study_name="evosearch-sparsity")
    with caplog.at_level("INFO", logger="evosearch"):
        report = run_search(settings(checkpoint), out, progress=False)  # the same command, again
    assert (f"--out {out} holds the files of a run that evaluated nothing (recipe.yaml, study.journal); "
            f"replacing them") in caplog.text
    assert report.search.runs == 1 and (out / "result.json").exists()
