"""A compression kind is one module: a toy kind (``toy_kind.py``) registered from outside evosearch
searches, records typed levels, exports and reloads like a built-in one."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import evosearch
import tiny_checkpoint
import toy_kind  # noqa: F401 (registers the kind)
from evosearch.kinds import KINDS, level_from_json, level_from_name
from evosearch.run import RunFolder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint.save(tmp_path_factory.mktemp("toy"))


def test_a_registered_kind_searches_exports_and_reloads(tmp_path, checkpoint):
    from evosearch.export import export_result

    model_dir, text = checkpoint
    space = tmp_path / "toy.yaml"
    space.write_text("name: toy\ncompression: {kind: toy-magnitude, percents: [0, 25, 50, 75]}\n"
                     "budget: {resource: sparsity, form: average}\nbaselines: [uniform]\n")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    compressed = evosearch.compress(model, tokenizer, space=space, budget=0.5, text=text.read_text(),
                                    generations=3, sampler_options={"offspring": 4}, sequence_length=64,
                                    calibration_sequences=4, fidelities=[128, 256], eval_tokens=512,
                                    database=str(tmp_path / "db"), progress=False)
    result = compressed.result
    assert "toy-magnitude" in KINDS
    assert result.budget.planned == pytest.approx(0.5) and result.budget.measured == pytest.approx(0.5, abs=0.01)
    assert {type(level).__name__ for level in result.levels.values()} <= {"Dense", "Pruned"}
    assert result.fitness["kl"] <= result.baselines["uniform"].kl + 1e-9  # the search starts from uniform
    assert compressed.model is model  # compressed in place

    folder = compressed.save(tmp_path / "run")
    again = RunFolder(folder.path).read_result()
    assert again.levels == result.levels  # the new level type round-trips through result.json
    level = next(iter(again.levels.values()))
    assert level_from_json(level.to_json()) == level == level_from_name(level.name)

    report = export_result(tmp_path / "run", tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert report.record["levels"] == {unit: level.name for unit, level in result.levels.items()}
