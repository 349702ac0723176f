import json
import subprocess
import sys

import pytest

from evosearch.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "evosearch", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["eval", "--model", "/definitely/missing"], "does not exist"),
    (["eval", "--tokens", "-3"], "--tokens must be a positive number"),
    (["units", "--model", "/"], "not a model directory"),
    (["export", "/"], "is not a finished search"),
    (["search", "drop", "--budget", "speed=3", "--out", "/tmp/never"], "a named budget is one of"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    done = run_cli(*args)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("evosearch: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in done.stderr


@pytest.mark.real
def test_eval_json_on_the_packaged_model(real, capsys):
    assert main(["eval", "--tokens", "2048", "--json", "--corpus", "brown"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["tokens"] == 2 * 1023 and 20 < record["perplexity"] < 45


@pytest.mark.real
def test_units_lists_the_real_model(real, capsys):
    assert main(["units", "--kind", "linear", "--json"]) == 0
    units = json.loads(capsys.readouterr().out)
    assert len(units) == 210 and units[-1]["name"] == "model.layers.29.mlp.down_proj"
