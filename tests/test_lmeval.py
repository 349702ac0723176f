"""lm-eval tasks from local files: evosearch's perplexity task agrees with `evosearch eval`; offline failures are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import tiny_checkpoint
from evosearch.cli import main
from evosearch.lmeval import TASKS_DIR

pytest.importorskip("lm_eval")


def eval_json(capsys, *args) -> dict:
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def agree(record: dict) -> None:
    """lm-eval scores the same windows: the same tokens (less a few merged at window edges), perplexity within 1%."""
    task = record["tasks"]["evosearch_perplexity"]
    windows = record["tokens"] // (record["window"] - 1)
    # lm-eval also scores each window's first token (from its prefix token); retokenising may merge one per window.
    assert record["tokens"] <= task["tokens"] <= record["tokens"] + windows
    assert task["token_perplexity"] == pytest.approx(record["perplexity"], rel=0.01)
    assert task["bits_per_byte"] == pytest.approx(record["bits_per_byte"], rel=0.01)


def test_perplexity_task_on_the_local_corpus_agrees_with_eval(checkpoint, capsys):
    model, corpus = checkpoint
    agree(eval_json(capsys, "--model", str(model), "--corpus", str(corpus), "--tokens", "2048", "--window", "512",
                    "--tasks", "evosearch_perplexity"))


def test_limit_counts_the_tokens_scored_and_no_git_message_leaks(checkpoint, tmp_path, monkeypatch, capfd):
    """--limit 1 scores the first of 4 windows; run outside a git checkout, lm-eval's `git describe` said
    "fatal: not a git repository" on stderr (a subprocess's: capfd sees it, capsys would not)."""
    model, corpus = checkpoint
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", str(model), "--corpus", str(corpus), "--tokens", "2048", "--window", "512",
                 "--tasks", "evosearch_perplexity", "--limit", "1", "--json"]) == 0
    out, err = capfd.readouterr()
    assert 511 <= json.loads(out)["tasks"]["evosearch_perplexity"]["tokens"] <= 512  # one window, not 4
    assert "fatal" not in err


@pytest.mark.real
def test_perplexity_task_agrees_with_eval_on_the_packaged_model(real, capsys):
    record = eval_json(capsys, "--tokens", "4096", "--tasks", "evosearch_perplexity")
    agree(record)
    assert 20 < record["tasks"]["evosearch_perplexity"]["token_perplexity"] < 45


def test_a_stock_task_runs_from_a_local_copy_of_its_data(checkpoint, tmp_path, capsys):
    """docs/lm-eval.md's recipe: include the stock YAML, point it at local JSONL, null the splits not there."""
    import lm_eval.tasks

    data = tmp_path / "wikitext-test.jsonl"
    data.write_text("".join(json.dumps({"page": f" = Page {i} = \n {tiny_checkpoint.text(80, seed=i)}"}) + "\n"
                            for i in range(3)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "wikitext_local.yaml").write_text(yaml.safe_dump({
        "include": str(Path(lm_eval.tasks.__file__).parent / "wikitext" / "wikitext.yaml"),
        "task": "wikitext_local", "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data)}}, "training_split": None, "validation_split": None}))
    model, corpus = checkpoint
    record = eval_json(capsys, "--model", str(model), "--corpus", str(corpus), "--tokens", "512",
                       "--tasks", "wikitext_local", "--task-path", str(tasks))
    metrics = record["tasks"]["wikitext_local"]
    assert set(metrics) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert metrics["byte_perplexity"] > 1


@pytest.mark.parametrize("task, error", [
    ({"dataset_kwargs": {"data_files": {"test": "{tmp}/absent.jsonl"}}},
     "lm-eval task mine: data file {tmp}/absent.jsonl does not exist"),
    ({"dataset_path": "evosearch-tests/no-such-dataset"},
     "lm-eval task mine: Couldn't reach 'evosearch-tests/no-such-dataset' on the Hub (OfflineModeIsEnabled); "
     "evosearch runs lm-eval offline"),
])
def test_offline_failures_are_one_line(checkpoint, tmp_path, capsys, task, error):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    config = {"include": str(TASKS_DIR / "evosearch_perplexity.yaml"), "task": "mine"} | task
    (tasks / "mine.yaml").write_text(yaml.safe_dump(config).replace("{tmp}", str(tmp_path)))
    model, corpus = checkpoint
    assert main(["eval", "--model", str(model), "--corpus", str(corpus), "--tokens", "512", "--tasks", "mine",
                 "--task-path", str(tasks)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"evosearch: error: {error.replace('{tmp}', str(tmp_path))}")
    assert not any("Traceback" in line for line in lines)


def test_unknown_task_and_task_path(checkpoint, tmp_path, capsys):
    model, corpus = checkpoint
    common = ["eval", "--model", str(model), "--corpus", str(corpus), "--tokens", "512"]
    assert main([*common, "--tasks", "no_such_task"]) == 2
    assert "lm-eval has no task 'no_such_task'" in capsys.readouterr().err
    assert main([*common, "--tasks", "evosearch_perplexity", "--task-path", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder of lm-eval task YAML files" in capsys.readouterr().err
