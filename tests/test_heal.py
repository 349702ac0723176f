"""Healing: the compression stays exactly as searched, the loss falls, an interrupted heal resumes.

Results are built by hand on a tiny random Llama (with a byte-level tokenizer, so the output
head is small) for sparsity, quantisation (``formats``, the interface ``evosearch.heal``
documents) and a pruned-and-quantised layer; dropped blocks come from a real ``run_search``.
"""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from evosearch import heal as heal_module
from evosearch.cli import main
from evosearch.data import Corpus
from evosearch.database.quantization import GPTQ, QuantFormat, recover_grid, rtn_quantize
from evosearch.database.sparsity import magnitude_prune
from evosearch.errors import EvosearchError
from evosearch.evaluate import kl_divergence
from evosearch.heal import HealSettings, distillation_loss, heal, healing_windows, load_quantized, value_bits
from evosearch.kinds import Quant, Sparse
from evosearch.pipeline import SearchSettings, run_search
from evosearch.run import RunFolder, default_draws
from evosearch.testing import result_of
from evosearch.units import architecture

from conftest import tiny_llama

FORMAT = QuantFormat(3, group_size=32)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A tiny random Llama whose next-token distributions are peaked enough for pruning to cost KL,
    with a byte-level tokenizer (256 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    path = tmp_path_factory.mktemp("dense")
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(path)
    tiny_llama(vocab_size=256, initializer_range=0.1, max_position_embeddings=512).save_pretrained(path)
    return path


def search_settings(dense_dir, **overrides) -> SearchSettings:
    values = dict(space="sparsity", budget=0.7, model=str(dense_dir), generations=1, sampler_options={"offspring": 2},
                  sequence_length=64, calibration_sequences=4, fidelities=[64, 128], eval_tokens=1024)
    return SearchSettings(**(values | overrides))


def make_result(path, dense_dir, compress, **overrides):
    """A result directory as a search leaves it: the compressed model in model/, result.json."""
    model = AutoModelForCausalLM.from_pretrained(dense_dir)
    arch = architecture(model)
    with torch.no_grad():
        record = compress(arch)
    model.save_pretrained(path / "model")
    shutil.copy(dense_dir / "tokenizer.json", path / "model")
    shutil.copy(dense_dir / "tokenizer_config.json", path / "model")
    RunFolder(path).write_result(result_of(search_settings(dense_dir, **overrides), **record))
    return path


def prune(arch, sparsity=0.7):
    levels = {}
    for unit in arch.units("linear"):
        weight = arch.module(unit.name).weight
        weight.copy_(magnitude_prune(weight, sparsity, None))
        levels[unit.name] = Sparse(zeros=round(sparsity * weight.numel()))
    return {"levels": levels, "assignment": {u.name: 0 for u in arch.units("linear")}}


def quantize(arch):
    """GPTQ 3-bit in groups of 32 everywhere; one layer pruned to 50% first, then rounded (0 stays 0)."""
    levels = {}
    X = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    for unit in arch.units("linear"):
        layer = arch.module(unit.name)
        if unit.name.endswith("layers.1.mlp.up_proj"):
            layer.weight.copy_(magnitude_prune(layer.weight, 0.5, None))
            layer.weight.copy_(rtn_quantize(layer.weight, FORMAT).dequantize())
            levels[unit.name] = Quant(bits=3, group_size=32, zeros=layer.weight.numel() // 2)
            continue
        H = X[:, : layer.in_features].T @ X[:, : layer.in_features] / len(X) if layer.in_features == 64 else \
            torch.eye(layer.in_features)
        layer.weight.copy_(GPTQ(layer.weight, H).quantize(FORMAT).dequantize())
        levels[unit.name] = Quant(bits=3, group_size=32)
    return {"levels": levels, "assignment": {u.name: 3 for u in arch.units("linear")}}


def quick(**overrides) -> HealSettings:
    return HealSettings(**(dict(tokens=64 * 2 * 12, batch_size=2, lr=3e-3, checkpoint_every=4, device="cpu")
                           | overrides))


def weights(folder) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def digest(folder) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.iterdir()))).hexdigest()


def test_heal_keeps_every_pruned_weight_and_lowers_the_loss(tmp_path, dense_dir):
    run = make_result(tmp_path, dense_dir, prune)
    searched = digest(run / "model")
    section = heal(run, quick(eval_corpora=["hamlet"]), progress=False)

    assert section["loss"]["last"] < 0.8 * section["loss"]["first"]
    assert section["kl"]["after"] < section["kl"]["before"]  # on the fitness sequences, which healing never saw
    assert set(section["perplexity"]) == {"brown", "hamlet"}  # the teacher is random: no claim on their values
    before, after = weights(run / "model"), weights(run / "healed")
    for name in before:
        if name.endswith("proj.weight"):
            assert torch.equal(before[name] == 0, after[name] == 0), name  # the same zeros, counted from the saves
            assert not torch.equal(before[name], after[name])  # and the rest trained
    assert section["kept"]["zeros"]["after"] == section["kept"]["zeros"]["before"] > 0
    assert all(section["checks"].values())
    assert digest(run / "model") == searched  # the searched model stays as it was
    assert json.loads((run / "result.json").read_text())["heal"] == section
    assert not (run / heal_module.CHECKPOINT).exists()


def test_a_pruned_weight_that_moves_is_caught_after_the_step(tmp_path, dense_dir, monkeypatch):
    run = make_result(tmp_path, dense_dir, prune)
    # Without the gradient mask, the check after the step must fail.
    monkeypatch.setattr(heal_module._Trainee, "_mask", staticmethod(lambda weight, zeros: None))
    with pytest.raises(RuntimeError, match="a pruned weight of .* moved during healing"):
        heal(run, quick(tokens=128), progress=False)


def test_heal_keeps_bit_widths_and_writes_the_codes(tmp_path, dense_dir):
    run = make_result(tmp_path, dense_dir, quantize, space="quant", budget=3)
    section = heal(run, quick(lr=1e-3, scale_lr=1e-2), progress=False)

    assert section["quantization"]["on_grid"] == section["quantization"]["groups"]  # GPTQ's grids found exactly
    assert section["quantization"]["weights_refitted"] == 0
    assert section["loss"]["last"] < section["loss"]["first"]
    before, after = weights(run / "model"), weights(run / "healed")
    codes = load_quantized(run / "healed")
    levels = RunFolder(run).read_result().levels
    assert set(codes) == set(levels)
    for name, level in levels.items():
        fmt = level.fmt
        W0, W1 = before[f"{name}.weight"], after[f"{name}.weight"]
        assert value_bits(W0, fmt) == value_bits(W1, fmt) == 3  # counted from the saved weights
        assert torch.equal(codes[name].dequantize(), W1)
        assert not torch.equal(W0, W1)
        if level.zeros:
            assert torch.equal(W1[W0 == 0], torch.zeros_like(W1[W0 == 0]))  # pruned and quantised: zeros kept
    assert all(section["checks"].values())


def test_recover_grid_finds_the_grid_of_gptq_and_rtn_weights():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 96, generator=g)
    X = torch.randn(256, 96, generator=g)
    H = X.T @ X / len(X)
    for fmt in (QuantFormat(3, 32), QuantFormat(4, None), QuantFormat(3, 32, symmetric=True), QuantFormat(2, 64)):
        for quantized in (GPTQ(W, H).quantize(fmt), GPTQ(W, H, act_order=True).quantize(fmt), rtn_quantize(W, fmt)):
            for dtype in (torch.float32, torch.bfloat16):
                values = quantized.dequantize().to(dtype)
                grid, exact = recover_grid(values, fmt)
                assert exact.all(), (fmt, dtype)
                eps = torch.finfo(dtype).eps
                assert torch.allclose(grid.dequantize().float(), values.float(), rtol=3 * eps, atol=0)
                assert int(grid.codes.max()) <= fmt.maxq
    grid, exact = recover_grid(W, QuantFormat(3, 32))  # weights on no 3-bit grid: round-to-nearest's grid
    assert not exact.any()
    assert torch.equal(grid.dequantize(), rtn_quantize(W, QuantFormat(3, 32)).dequantize())


def test_dropped_units_of_a_real_search_stay_dropped(tmp_path, dense_dir, monkeypatch, capsys):
    draws = []
    original = Corpus.calibration_sequences
    monkeypatch.setattr(Corpus, "calibration_sequences",
                        lambda self, n, length, seed=0: draws.append((n, length, seed)) or original(self, n, length, seed))
    settings = search_settings(dense_dir, space="drop", budget=0.5, database=str(tmp_path / "db"))
    report = run_search(settings, tmp_path / "run", progress=False)
    recorded = RunFolder(tmp_path / "run").read_result().calibration_draws()
    assert sorted(draws) == sorted((d.sequences, d.length, d.seed) for d in recorded.values())  # what heal avoids

    code = main(["heal", str(tmp_path / "run"), "--tokens", "768", "--batch-size", "2", "--lr", "3e-3",
                 "--device", "cpu", "--eval-corpus", "hamlet"])
    printed = capsys.readouterr().out
    assert code == 0 and "perplexity hamlet" in printed and "dropped_units ok" in printed
    section = json.loads((tmp_path / "run" / "result.json").read_text())["heal"]
    # Measured before healing as the search measured them: the same model, text and KL.
    assert section["kl"]["before"] == pytest.approx(report.fitness["kl"], rel=1e-4)
    assert section["perplexity"]["brown"]["before"] == pytest.approx(report.perplexity["compressed"], rel=1e-4)
    assert section["kl"]["after"] < section["kl"]["before"]

    dropped = [u for u, level in report.assignment.items() if level == "drop"]
    assert sorted(section["kept"]["dropped"]) == sorted(dropped) and len(dropped) == 2
    searched, healed = (AutoModelForCausalLM.from_pretrained(tmp_path / "run" / f) for f in ("model", "healed"))
    units = {u.name: u for u in architecture(healed).units(("attention", "mlp"))}
    for name, unit in units.items():
        assert architecture(healed).is_dropped(unit) == (name in dropped)
        same = [torch.equal(searched.get_submodule(lin).weight, healed.get_submodule(lin).weight)
                for lin in unit.linears]
        assert all(same) if name in dropped else not any(same)


def test_an_interrupted_heal_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, dense_dir, monkeypatch):
    whole = make_result(tmp_path / "whole", dense_dir, prune)
    cut = make_result(tmp_path / "cut", dense_dir, prune)
    settings = quick(tokens=64 * 2 * 10, checkpoint_every=3)
    expected = heal(whole, settings, progress=False)

    step, calls = heal_module._train_step, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 8:  # steps 1-7 done, checkpoints after steps 3 and 6
            raise KeyboardInterrupt
        return step(*args)

    monkeypatch.setattr(heal_module, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        heal(cut, settings, progress=False)
    assert torch.load(cut / heal_module.CHECKPOINT / "state.pt", weights_only=True)["step"] == 6
    monkeypatch.setattr(heal_module, "_train_step", step)
    with pytest.raises(EvosearchError, match="interrupted heal with other settings"):
        heal(cut, settings.model_copy(update={"lr": 1e-4}), progress=False)

    resumed = heal(cut, settings, progress=False)
    assert resumed["loss"] == expected["loss"]
    assert resumed["kl"] == expected["kl"]
    a, b = weights(whole / "healed"), weights(cut / "healed")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_heal_refuses_bad_input(tmp_path, dense_dir):
    with pytest.raises(EvosearchError, match="is not a finished search"):
        heal(tmp_path, quick(), progress=False)
    run = make_result(tmp_path / "run", dense_dir, prune)
    with pytest.raises(EvosearchError, match="--eval-corpus brown is the search's corpus"):
        heal(run, quick(eval_corpora=["brown"]), progress=False)
    heal(run, quick(tokens=128), progress=False)
    with pytest.raises(EvosearchError, match="already holds a healed model .* --force"):
        heal(run, quick(tokens=128), progress=False)
    assert heal(run, quick(tokens=128, seed=1), force=True, progress=False)["settings"]["seed"] == 1

    bad = make_result(tmp_path / "bad", dense_dir, lambda arch: {"levels": {"model.layers.0.q_proj": Quant(bits=3)}},
                      space="quant", budget=3)
    with pytest.raises(EvosearchError, match=r"names units the model does not have \(model.layers.0.q_proj"):
        heal(bad, quick(), progress=False)
    result = json.loads((bad / "result.json").read_text())
    result["levels"] = {"model.layers.0.self_attn.q_proj": {"type": "quant", "bits": 9}}
    (bad / "result.json").write_text(json.dumps(result))
    with pytest.raises(EvosearchError, match=r"result.json: levels: model.layers.0.self_attn.q_proj.bits: Input should be less than or equal to 8"):
        heal(bad, quick(), progress=False)


def test_healing_windows_avoid_every_token_the_search_drew_at_any_length(dense_dir):
    corpus = Corpus("counting", np.arange(20_000, dtype=np.int32))
    settings = search_settings(dense_dir, sequence_length=256, calibration_sequences=12, fidelities=[256, 2048])
    used, draws = set(), default_draws(settings)
    for d in draws.values():
        used |= {int(t) for window in corpus.calibration_sequences(d.sequences, d.length, d.seed) for t in window}
    for length in (64, 256, 1000):
        free = healing_windows(corpus, draws, length)
        taken = {int(t) for start in free for t in corpus.calibration[start : start + length]}
        assert not taken & used
        slots = len(corpus.calibration) // length  # every other whole window is free
        assert len(free) == sum(not used & set(corpus.calibration[i * length : (i + 1) * length].tolist())
                                for i in range(slots))
    free = healing_windows(corpus, draws, 64)
    order = heal_module._order(free, 2 * len(free) + 3, seed=0)  # passes over the free windows, reshuffled
    assert sorted(order[: len(free)]) == sorted(order[len(free) : 2 * len(free)]) == sorted(free)
    assert not np.array_equal(order[: len(free)], order[len(free) : 2 * len(free)])

def test_heal_cli_names_the_bad_option(tmp_path, capsys):
    assert main(["heal", str(tmp_path), "--tokens", "0"]) == 2
    assert "--tokens" in capsys.readouterr().err


def test_distillation_losses():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g) * 3
    forward = kl_divergence(torch.log_softmax(teacher, -1), student)
    reverse = kl_divergence(torch.log_softmax(student, -1), teacher)
    assert distillation_loss(student, teacher, "kl") == pytest.approx(float(forward), rel=1e-5)
    assert distillation_loss(student, teacher, "reverse-kl") == pytest.approx(float(reverse), rel=1e-5)
    assert distillation_loss(student, teacher, "mix", 0.25) == pytest.approx(float(0.25 * forward + 0.75 * reverse),
                                                                           rel=1e-5)
    assert float(distillation_loss(teacher, teacher, "mix")) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.real
def test_healing_the_packaged_model_lowers_its_perplexity(tmp_path):
    """A few steps on the 50% magnitude-pruned packaged model win back held-out perplexity and KL."""
    from evosearch.model import load_model

    model, tokenizer = load_model(None, device="cpu")
    arch = architecture(model)
    with torch.no_grad():
        record = prune(arch, 0.5)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    settings = SearchSettings(space="sparsity", budget=0.5, sequence_length=128, calibration_sequences=4,
                              fidelities=[256], eval_tokens=1024)
    RunFolder(tmp_path).write_result(result_of(settings, **record))
    section = heal(tmp_path, HealSettings(tokens=128 * 2 * 4, batch_size=2, lr=1e-4, device="cpu"), progress=False)

    brown = section["perplexity"]["brown"]
    assert brown["dense"] < brown["after"] < 0.9 * brown["before"]
    assert section["kl"]["after"] < 0.9 * section["kl"]["before"]
    assert section["kept"]["zeros"]["after"] == section["kept"]["zeros"]["before"]
