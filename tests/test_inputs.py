"""Bad input, tried as a new user would: one line, exit status 2, before anything is built.

Every case runs on the tiny checkpoint (2 blocks, 4 drop units, vocabulary 320, context 1024).
"""

from __future__ import annotations

import pytest

from evosearch.cli import main
from evosearch.errors import EvosearchError
from evosearch.pipeline import SearchSettings
from evosearch.recipe import Recipe


def search(capsys, tmp_path, checkpoint, *args, space="sparsity", budget="0.5"):
    """`evosearch search` on the checkpoint: (exit status, last line on stderr); checks nothing was built."""
    model, corpus = checkpoint
    out, database = tmp_path / "run", tmp_path / "db"
    code = main(["search", space, "--budget", budget, "--model", str(model), "--corpus", str(corpus),
                 "--sequence-length", "64", "--calibration-sequences", "2", "--fidelities", "64",
                 "--eval-tokens", "1024", "--database", str(database), "--out", str(out), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in lines)
    assert not database.exists()  # refused before the database is built
    return code, lines[-1]


@pytest.mark.parametrize("args, message", [
    (["--sampler", "uniform", "--offspring", "4"],
     "--offspring applies to --sampler evopress only (this search uses uniform); drop it"),
    (["--sampler", "tpe", "--trials", "5", "--generations", "3"],
     "--generations applies to --sampler evopress only (this search uses tpe); drop it"),
    (["--sampler", "tpe"], "--sampler tpe needs --trials N: the number of candidates it evaluates"),
    (["--fidelities", "256,128"],
     "--fidelities must be increasing token counts like 512,2048 (the last is the full fitness), got 256,128"),
    (["--sequence-length", "2048", "--fidelities", "2048"],
     "--sequence-length 2048 exceeds the model's context of 1024 tokens (max_position_embeddings); lower "
     "--sequence-length to at most 1024"),
    (["--fidelities", "64,100000"], "--fidelities up to 100000 needs 1563 sequences of 64 tokens, but corpus"),
])
def test_search_settings_are_refused_in_one_line(checkpoint, capsys, tmp_path, args, message):
    code, line = search(capsys, tmp_path, checkpoint, *args)
    assert code == 2 and line.startswith(f"evosearch: error: {message}")


@pytest.mark.parametrize("space, budget, message", [
    ("drop", "1.0", "--budget 1 must be a fraction of the units in [0, 1) (1 removes every one)"),
    ("drop", "-0.25", "--budget -0.25 must be a fraction of the units in [0, 1)"),
    ("drop", "0.9", "--budget 0.9 rounds to all 4 units; at most 0.75 keeps one"),
    ("drop-width", "0", "--budget 0 must be a fraction of the searched blocks' parameters kept, in (0, 1]"),
    ("sparsity-2of4", "0.9", "budget average sparsity=0.9 is out of reach: this space reaches at most 0.5"),
])
def test_budgets_that_remove_everything_or_cannot_be_met(checkpoint, capsys, tmp_path, space, budget, message):
    code, line = search(capsys, tmp_path, checkpoint, space=space, budget=budget)
    assert code == 2 and line.startswith(f"evosearch: error: {message}")


def test_fidelities_whose_fitness_cannot_fit_in_memory(checkpoint, capsys, tmp_path, monkeypatch):
    """2^20 tokens: 1.25 GiB of teacher log-probabilities (x 320 x 4 bytes), 0.75 GiB of inputs to the 2 blocks
    and the head (x 64 x 4 bytes); refused before the corpus is read, which has far fewer."""
    monkeypatch.setattr("evosearch.pipeline._available_memory", lambda device: (2**29, "host memory"))
    code, line = search(capsys, tmp_path, checkpoint, "--fidelities", f"64,{2**20}")
    assert code == 2 and line == (
        "evosearch: error: --fidelities up to 1048576: the fitness keeps 2.0 GiB for its 1,048,576 tokens (the "
        "teacher's log-probabilities, tokens x vocabulary 320 x 4 bytes: 1.2 GiB; every block's input, for prefix "
        "reuse: 0.8 GiB) but 0.5 GiB of host memory is available; pass --top-k 64 (the teacher keeps 64 "
        "log-probabilities a token) or use fewer fidelity tokens")
    code, line = search(capsys, tmp_path, checkpoint, "--fidelities", f"64,{2**20}", "--top-k", "8")
    assert code == 2 and "(the teacher's top-8 log-probabilities: " in line and line.endswith(
        "is available; use fewer fidelity tokens")


def test_recipes_get_the_same_checks(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("space: drop\nbudget: 0.25\nsampler: shortgpt\ngenerations: 3\n")
    with pytest.raises(EvosearchError, match="^--generations applies to --sampler evopress only"):
        Recipe.load(recipe)
    with pytest.raises(EvosearchError, match="^sampler 'evopress': bad sampler_options: .*'offsprings'"):
        SearchSettings(budget=0.5, sampler_options={"offsprings": 4})
    with pytest.raises(EvosearchError, match="^--fidelities must be increasing"):
        SearchSettings(budget=0.5, fidelities=[512, 512])


def test_a_space_s_evopress_defaults_do_not_reach_another_sampler(checkpoint, tmp_path):
    """spaces/sparsity.yaml says offspring: 16 for EvoPress; the uniform baseline takes no options."""
    from evosearch.pipeline import run_search

    model, corpus = checkpoint
    settings = SearchSettings(space="sparsity", budget=0.5, sampler="uniform", model=str(model), corpus=str(corpus),
                              sequence_length=64, calibration_sequences=2, fidelities=[64], eval_tokens=1024,
                              baselines=[], database=str(tmp_path / "db"))
    report = run_search(settings, tmp_path / "run", progress=False)
    assert report.search.sampler == "uniform" and set(report.assignment.values()) == {0}


def test_eval_refuses_a_window_beyond_the_model_context(checkpoint, capsys):
    model, corpus = checkpoint  # max_position_embeddings 1024: rotary positions run past it without an error
    assert main(["eval", "--model", str(model), "--corpus", str(corpus), "--tokens", "2048", "--window", "2048"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "evosearch: error: --window 2048 exceeds the model's context of 1024 tokens (max_position_embeddings); "
        "lower --window to at most 1024")


def test_eval_refuses_a_tokenizer_beyond_the_model_vocabulary(checkpoint, tmp_path, capsys):
    """A model of 100 entries saved with the checkpoint's tokenizer of 320: the embedding lookup would fail."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    model, corpus = checkpoint
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(model).save_pretrained(tmp_path)
    assert main(["eval", "--model", str(tmp_path), "--corpus", str(corpus), "--tokens", "512"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"evosearch: error: the tokenizer of --model gives --corpus {corpus} token ids up to 3")
    assert err[-1].endswith("but the model's vocabulary has 100 entries; save the model with the tokenizer it was "
                            "trained with")
    assert not any("Traceback" in line for line in err)


def test_heal_refuses_a_sequence_length_beyond_the_model_context(checkpoint, tmp_path, capsys):
    import json
    import shutil

    model, corpus = checkpoint
    shutil.copytree(model, tmp_path / "model")
    settings = SearchSettings(budget=0.5, model=str(model), corpus=str(corpus), sequence_length=64, fidelities=[64])
    (tmp_path / "result.json").write_text(json.dumps({"settings": settings.model_dump()}))
    assert main(["heal", str(tmp_path), "--tokens", "4096", "--sequence-length", "2048"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "evosearch: error: --sequence-length 2048 exceeds the model's context of 1024 tokens "
        "(max_position_embeddings); lower --sequence-length to at most 1024")
