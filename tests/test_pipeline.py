"""The main job end to end: search, report, saved model, resume, bad input."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from evosearch.candidate import CandidateModel
from evosearch.cli import main
from evosearch.compression import CompressionSpace
from evosearch.database.store import Database
from evosearch.errors import EvosearchError
from evosearch.model import load_model
from evosearch.pipeline import SearchSettings, run_search
from evosearch.units import architecture


def tiny_settings(model_dir, database, **overrides) -> SearchSettings:
    values = dict(space="sparsity", budget=0.5, model=str(model_dir), generations=2, sampler_options={"offspring": 4},
                  sequence_length=64, calibration_sequences=4, fidelities=[64, 128], eval_tokens=1024,
                  database=str(database))
    return SearchSettings(**(values | overrides))


def searched_sparsity(model, arch) -> float:
    linears = [arch.module(u.name) for u in arch.units("linear")]
    return sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)


def test_sparsity_search_end_to_end(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    settings = tiny_settings(tiny_model_dir, tmp_path / "db")
    report = run_search(settings, out, progress=False)

    saved = json.loads((out / "result.json").read_text())
    assert saved["assignment"] == report.assignment
    assert saved["budget"]["measured"] == pytest.approx(0.5, abs=1e-3)
    assert report.fitness["kl"] <= report.baselines["uniform"].kl + 1e-6  # the search keeps the best
    assert saved["settings"] == settings.model_dump()

    # The saved model: within budget counted from its weights, and the same function as the candidate.
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert searched_sparsity(reloaded, architecture(reloaded)) == pytest.approx(0.5, abs=1e-3)
    model, _ = load_model(tiny_model_dir, device="cpu")
    arch = architecture(model)
    problem = CompressionSpace.load("sparsity").materialize(arch, 0.5)
    CandidateModel(model, arch, problem, Database(tmp_path / "db")).apply(report.assignment)
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)

    # Resume replays the study: same answer, no new evaluation.
    again = run_search(settings, out, resume=True, progress=False)
    assert again.assignment == report.assignment
    assert again.search.evaluations == report.search.evaluations


def test_drop_search_reports_shortgpt_and_drops_exactly(tmp_path, tiny_model_dir):
    settings = tiny_settings(tiny_model_dir, tmp_path / "db", space="drop", budget=0.25)
    report = run_search(settings, tmp_path / "run", progress=False)
    assert report.budget.measured == 1  # a quarter of 2 blocks x (attention, MLP)
    assert list(report.assignment.values()).count("drop") == 1
    assert list(report.baselines["shortgpt"].assignment.values()).count("drop") == 1


def test_output_folder_is_never_overwritten_by_accident(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "result.json").write_text("{}")
    with pytest.raises(EvosearchError, match="already holds a finished search; pass --resume .* or --force"):
        run_search(tiny_settings(tiny_model_dir, tmp_path / "db"), out, progress=False)


def run_cli(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def test_search_cli_bad_input(tmp_path, capsys, tiny_model_dir):
    model = ["--model", str(tiny_model_dir)]
    code, err = run_cli(capsys, "search", "sparsity", "--budget", "1.5", "--out", str(tmp_path / "a"), *model)
    assert code == 2 and "outside this space's range" in err[-1]
    typo = tmp_path / "typo.yaml"
    typo.write_text("compression: {kind: sparsity, method: sparsegtp}\nbudget: {resource: sparsity}\n")
    code, err = run_cli(capsys, "search", str(typo), "--budget", "0.5", "--out", str(tmp_path / "b"), *model)
    assert code == 2 and "compression.method" in err[-1]
    code, err = run_cli(capsys, "search", "sparsity", "--budget", "0.5", "--fidelities", "64,x",
                        "--out", str(tmp_path / "c"), *model)
    assert code == 2 and "--fidelities" in err[-1]
    code, err = run_cli(capsys, "search", "sparsity", "--budget", "0.5", "--sampler", "annealing",
                        "--out", str(tmp_path / "d"), "--database", str(tmp_path / "db"), "--sequence-length", "64",
                        "--calibration-sequences", "2", "--fidelities", "64", "--eval-tokens", "1024", *model)
    assert code == 2 and "unknown sampler 'annealing'" in err[-1]


@pytest.mark.real
def test_short_search_on_the_packaged_model(tmp_path):
    """A real search in a minute: Wanda levels shared by all layers, EvoPress over equal-shape groups."""
    space = tmp_path / "wanda.yaml"
    space.write_text("name: wanda-test\ncompression: {kind: sparsity, method: wanda, levels: [0.4, 0.5, 0.6]}\n"
                     "budget: {resource: sparsity, form: average, tolerance: 0.001}\nbaselines: [uniform]\n")
    settings = SearchSettings(space=str(space), budget=0.5, generations=2, sampler_options={"offspring": 4},
                              sequence_length=128, calibration_sequences=4, fidelities=[128, 256], eval_tokens=1024,
                              database=str(tmp_path / "db"))
    report = run_search(settings, tmp_path / "run", progress=False)
    assert report.budget.measured == pytest.approx(0.5, abs=0.001)
    assert 25 < report.perplexity["dense"] < 40
    assert report.perplexity["dense"] < report.perplexity["compressed"] < 200
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert searched_sparsity(reloaded, architecture(reloaded)) == pytest.approx(0.5, abs=0.001)


def test_width_search_exports_the_sub_network_it_reports(tmp_path, tiny_model_dir):
    from evosearch.export import export_result
    from evosearch.runtime import load_exported

    space = tmp_path / "width.yaml"
    space.write_text("name: width-test\ncompression: {kind: width, granularity: 32, min_keep: 0.0, "
                     "reform: {method: admm, iterations: 5}}\nbudget: {resource: kept, form: average}\n"
                     "baselines: [uniform]\n")
    settings = tiny_settings(tiny_model_dir, tmp_path / "db", space=str(space), budget=0.6)
    report = run_search(settings, tmp_path / "run", progress=False)
    assert report.budget.measured <= 0.6 + 1e-9
    assert report.budget.measured == pytest.approx(report.budget.planned, abs=1e-9)
    assert report.reformation["kl_after"] <= report.reformation["kl_before"]

    exported = export_result(tmp_path / "run", tmp_path / "export")
    searched = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    pruned = report.parameters["dense"] - report.parameters["kept"]
    removed_norms = searched.config.hidden_size * sum(
        len(o.get("skip", [])) for o in exported.record["blocks"]["overrides"])
    assert exported.parameters == searched.num_parameters() - pruned - removed_norms
    model, _ = load_exported(tmp_path / "export", device="cpu")
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, searched(ids).logits, rtol=1e-4, atol=1e-5)


def test_a_search_folder_keeps_its_study_in_a_journal_file_or_an_earlier_study_db(tmp_path):
    from evosearch.report import _study_file
    from evosearch.run import RunFolder

    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir(), old.mkdir()
    (old / "study.db").touch()  # a search started before the journal file: resumed where it is
    assert RunFolder(new).study_storage() == str(new.resolve() / "study.journal")
    assert RunFolder(old).study_storage() == f"sqlite:///{old.resolve() / 'study.db'}"
    assert _study_file(new) is None
    (new / "study.journal").touch()
    assert _study_file(new) == RunFolder(new).study_storage() and _study_file(old) == RunFolder(old).study_storage()


HOLD = """
import sys, time
from pathlib import Path
from evosearch.run import RunFolder

with RunFolder(sys.argv[1]).lock():
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_run_folder_is_locked_while_a_process_works_in_it(tmp_path, capsys):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from evosearch.recipe import Recipe
    from evosearch.run import RunFolder

    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    (out / "result.json").write_text('{"settings": {"budget": 0.5}}')
    (tmp_path / "recipe.yaml").write_text(Recipe(budget=0.5).to_yaml())
    search = ["search", "sparsity", "--budget", "0.5", "--out", str(out)]
    # flock locks belong to an open file, so a second lock in this process conflicts as one in another would.
    with RunFolder(out).lock():
        for argv in ([*search, "--force"], [*search, "--resume"], ["run", str(tmp_path / "recipe.yaml"), "--out",
                     str(out), "--resume"], ["heal", str(out), "--tokens", "1000"]):
            assert main(argv) == 2
            name = str(out) if argv[0] == "heal" else f"--out {out}"
            assert capsys.readouterr().err.startswith(f"evosearch: error: {name} is in use by process {os.getpid()} "
                                                      f"on {socket.gethostname()} since ")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "model", "result.json"]  # --force deleted nothing

    # Another process's lock, released by the OS when that process dies (here, killed).
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "held\n"
        assert main([*search, "--force"]) == 2
        assert f"is in use by process {holder.pid} on " in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    with RunFolder(out).lock():
        assert (out / ".lock").read_text().startswith(f"process {os.getpid()} ")
