"""Bit-width and joint sparsity x bit-width spaces: levels, database entries, swaps, budgets."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from evosearch.candidate import CandidateModel
from evosearch.compression import CompressionSpace
from evosearch.database.build import build_database
from evosearch.database.hessian import Hessian, layer_error
from evosearch.database.quantization import GPTQ, QuantFormat, QuantizedWeight, distinct_per_group, rtn_quantize
from evosearch.database.sparsity import magnitude_prune
from evosearch.database.store import Database
from evosearch.engine import search
from evosearch.errors import EvosearchError
from evosearch.evaluate import Teacher
from evosearch.fitness import KLFitness
from evosearch.kinds import Quant
from evosearch.layouts import packed_bytes
from evosearch.pipeline import SearchSettings, open_database
from evosearch.units import architecture
from layer_data import layer  # noqa: F401 (fixture)


def sequences(n=4, length=32, seed=0):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def space(name: str = "quant", **compression) -> CompressionSpace:
    """A ready space with some compression fields replaced (and validated)."""
    spec = CompressionSpace.load(name).model_dump()
    return CompressionSpace.model_validate(spec | {"compression": spec["compression"] | compression})


def block0_hessian(model, arch, name, ids, batch_size=2) -> Hessian:
    """The Hessian the database builder sees for a block-0 layer (same batches, same order)."""
    h = Hessian(arch.module(name).in_features)
    hook = arch.module(name).register_forward_pre_hook(lambda _, args: h.add_batch(args[0]))
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            model(ids[start:start + batch_size])
    hook.remove()
    return h


def test_packed_bytes_by_hand():
    asym, sym = QuantFormat(3, 128), QuantFormat(3, 128, symmetric=True)
    # 576 x 1536 at 3 bits: 144 int32 words of codes a row, 12 groups a row: float32 scales,
    # zero points packed along the 576 rows (54 words per group), the int64 shape
    codes, scales, zeros = 576 * 144 * 4, 576 * 12 * 4, 54 * 12 * 4
    assert packed_bytes((576, 1536), asym) == codes + scales + zeros + 16
    assert packed_bytes((576, 1536), sym) == codes + scales + 16
    half = 576 * 1536 // 2
    # half zero: a uint8 bitmask (192 bytes a row) + the kept codes in one stream (3 bits each) win
    assert packed_bytes((576, 1536), asym, half) == 576 * 192 + 4 * (half * 3 // 32) + scales + zeros + 16
    # 20% zero at 3 bits: the bitmask costs more than it saves, so the dense layout is kept
    assert packed_bytes((576, 1536), asym, int(0.8 * 576 * 1536)) == packed_bytes((576, 1536), asym)
    # a ragged last group (3 per row), one group per row, words rounded up
    assert packed_bytes((3, 10), QuantFormat(3, 4)) == 3 * 1 * 4 + 3 * 3 * 4 + 1 * 3 * 4 + 16
    assert packed_bytes((3, 10), QuantFormat(8, None)) == 3 * 3 * 4 + 3 * 1 * 4 + 1 * 1 * 4 + 16
    # 4 of 30 weights kept: 2 mask bytes a row and one word of codes beat 3 words
    assert packed_bytes((3, 10), QuantFormat(3, 4), 4) == 3 * 2 + 1 * 4 + 3 * 3 * 4 + 1 * 3 * 4 + 16


@pytest.mark.parametrize("name, options, budget", [("quant", {"group_size": 64, "symmetric": True}, 4.0),
                                                   ("sparsity-quant", {"sparsity": [0.0, 0.5], "bits": [3, 4]}, 0.25)])
def test_bytes_budgets_count_quant_levels_as_their_space_does(llama, name, options, budget):
    """`--budget bytes=...` (hardware.attach) and the space's own byte count agree, for any group size
    and for pruned levels: both are packed_bytes of the layout export writes."""
    from evosearch.hardware import attach

    problem = space(name, **options).materialize(architecture(llama), budget)
    own = {u.name: u.resources["bytes"] for u in problem.space.units}
    attached = attach(problem, None)
    assert {u.name: u.resources["bytes"] for u in attached.space.units} == own
    pruned = [level for levels in problem.levels.values() for level in levels if level.zeros]
    assert bool(pruned) == (name == "sparsity-quant")
    assert all(problem.compression.latency_class(level) == level.model_copy(update={"zeros": 0})
                          for level in pruned)  # they run as their packed format


def test_distinct_per_group_counts_values_in_each_group():
    W = torch.tensor([[1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 0.0, 4.0], [5.0, 6.0, 7.0, 8.0, 9.0, 9.0, 9.0, 9.0]])
    assert distinct_per_group(W, 3).tolist() == [[2, 1, 2], [3, 2, 1]]  # the last group is short
    assert distinct_per_group(W, None).tolist() == [[5], [5]]


def test_quant_levels_groups_and_budget(llama):
    problem = CompressionSpace.load("quant").materialize(architecture(llama), 3.5)
    sp, budget = problem.space, problem.budget
    assert budget.label == "max_average bits" and budget.target == 3.5
    unit = sp.units[0]
    assert unit.levels == [6, 5, 4, 3, 2] and problem.levels[unit.name] == [Quant(bits=b) for b in unit.levels]
    assert {u.group for u in sp.units} == {"64x64", "32x64", "128x64", "64x128"}
    fmt = problem.spec.compression.format(3)
    assert unit.resources["bytes"][3] == packed_bytes((64, 64), fmt)
    assert unit.resources["fp16_fraction"][3] == packed_bytes((64, 64), fmt) / (2 * 64 * 64)
    # a level switch within a group of equal shapes keeps the average bits exactly
    three = {u.name: 3 for u in sp.units}
    a, b = [u.name for u in sp.units if u.group == "128x64"][:2]
    assert budget.usage(sp, dict(three, **{a: 4, b: 2})) == budget.usage(sp, three) == 3.0
    with pytest.raises(EvosearchError, match=r"--budget 1.5 is out of reach: .* bits .* \[2, 6\]"):
        CompressionSpace.load("quant").materialize(architecture(llama), 1.5)


def test_joint_levels_drop_pairs_whose_bitmask_saves_nothing(llama):
    problem = space("sparsity-quant", sparsity=[0.0, 0.25, 0.5], bits=[3, 4, 8]).materialize(architecture(llama), 0.2)
    unit = problem.space.units[0]
    # 25% at 3 or 4 bits: a bitmask (1 bit) costs at least the 0.75 or 1 bit it saves
    assert set(unit.levels) == {"0%@3bit", "0%@4bit", "0%@8bit", "25%@8bit", "50%@3bit", "50%@4bit", "50%@8bit"}
    fractions = unit.resources["fp16_fraction"]
    assert fractions == sorted(fractions, reverse=True)  # most bytes first
    i, half = unit.levels.index("50%@4bit"), 64 * 64 // 2
    assert problem.levels[unit.name][i] == Quant(bits=4, zeros=half) and problem.levels[unit.name][i].key == \
        f"zeros={half},bits=4"
    assert unit.resources["bytes"][i] == packed_bytes((64, 64), QuantFormat(4, 128), half)
    assert problem.budget.label == "max_average fp16_fraction"


@pytest.mark.parametrize("fixture, compression", [
    ("llama", {"method": "rtn", "group_size": 16, "bits": [2, 3, 8]}),
    ("llama", {"method": "gptq", "group_size": 16, "bits": [2, 3, 8]}),
    ("opt", {"method": "gptq", "group_size": None, "symmetric": True, "act_order": True, "bits": [3, 4]}),
])
def test_quant_database_levels_are_exact_and_swaps_are_reversible(request, fixture, compression):
    model = request.getfixturevalue(fixture)
    arch = architecture(model)
    spec = space("quant", **compression)
    comp = spec.compression
    problem = spec.materialize(arch, 3)
    database = Database()
    ids = sequences()
    build_database(model, arch, problem, database, ids, batch_size=2, progress=False)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    candidate = CandidateModel(model, arch, problem, database)
    first = problem.space.units[0].name
    H = block0_hessian(model, arch, first, ids).H
    for bits in comp.bits:
        level = {u.name: bits for u in problem.space.units}
        candidate.apply(level)
        for unit in problem.space.units:
            most = distinct_per_group(arch.module(unit.name).weight, comp.group_size)
            assert int(most.max()) <= 2**bits
        W, W_hat = dense[f"{first}.weight"], arch.module(first).weight
        if comp.method == "rtn":
            expected = rtn_quantize(W, comp.format(bits))
        else:  # the database holds exactly what the layer-wise algorithm makes of the builder's Hessian
            expected = GPTQ(W, H, act_order=comp.act_order).quantize(comp.format(bits))
        assert torch.equal(W_hat, expected.dequantize())
        assert comp.measure(arch, problem, candidate.levels())["bits"] == bits
    candidate.restore()
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())  # bit-identical


@pytest.mark.parametrize("name", ["quant", "sparsity-quant"])
def test_a_searched_bit_width_assignment_exports_packed_and_loads_with_the_same_logits(llama, tmp_path, name):
    from evosearch.export import ExportJob, export_model
    from evosearch.runtime import load_exported

    arch = architecture(llama)
    spec = space(name, method="rtn", group_size=16, bits=[3, 4])
    problem = spec.materialize(arch, 3.5 if name == "quant" else 0.3)
    database = Database()
    build_database(llama, arch, problem, database, sequences(), batch_size=2, progress=False)
    rng = np.random.default_rng(0)
    assignment = {u.name: u.levels[int(rng.integers(len(u.levels)))] for u in problem.space.units}
    candidate = CandidateModel(llama, arch, problem, database)
    candidate.apply(assignment)
    job = ExportJob.for_problem(llama, problem, assignment)
    assert set(job.quantized) == set(problem.model_units)  # every searched layer is packed, none re-rounded
    report = export_model(job, tmp_path / "packed", format="packed")
    assert {name: spec["bits"] for name, spec in report.record["packed"].items()} == {
        unit: problem.level(unit, level).bits for unit, level in assignment.items()}
    loaded, _ = load_exported(tmp_path / "packed", device="cpu")
    ids = sequences(2, 24, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, llama(ids).logits, rtol=1e-4, atol=1e-5)
    candidate.restore()


def test_measured_usage_checks_the_weights_against_the_applied_format(llama):
    arch = architecture(llama)
    problem = space("quant", method="rtn", group_size=16, bits=[2, 4, 8]).materialize(arch, 4)
    database = Database()
    build_database(llama, arch, problem, database, sequences(), batch_size=2, progress=False)
    candidate = CandidateModel(llama, arch, problem, database)
    units = problem.space.units
    mixed = {u.name: (8 if i % 3 == 0 else 2 if i % 3 == 1 else 4) for i, u in enumerate(units)}
    if problem.budget.usage(problem.space, mixed) > 4:
        mixed = {u.name: 4 for u in units}
    candidate.apply(mixed)
    kind = problem.compression
    counted = kind.measure(arch, problem, candidate.levels())
    assert counted["bits"] == pytest.approx(problem.budget.usage(problem.space, mixed), abs=1e-12)
    assert counted["bytes"] == sum(u.resources["bytes"][u.levels.index(mixed[u.name])] for u in units)
    lie = dict(candidate.levels(), **{units[0].name: Quant(bits=2, group_size=16)})  # the layer holds 8 bits
    candidate.apply({**mixed, units[0].name: 8})
    with pytest.raises(RuntimeError, match="distinct values in one group: not the applied 2-bit format"):
        kind.measure(arch, problem, lie)


def test_gptq_with_a_fixed_mask_keeps_zeros_and_beats_rounding_the_pruned_weight(layer):
    W, h, _ = layer
    pruned = magnitude_prune(W, 0.5)
    keep = pruned != 0
    fmt = QuantFormat(4, 64)
    for act_order in (False, True):
        gptq = GPTQ(pruned, h.H, act_order=act_order)
        q = gptq.quantize(fmt, keep).dequantize()
        assert (q[~keep] == 0).all()
        assert (gptq.quantize(fmt).dequantize()[~keep] != 0).any()  # unmasked, GPTQ's updates revive pruned weights
        assert int(distinct_per_group(q, 64).max()) <= 16
        # the quantisation step's own error, on the pruned layer's outputs
        assert layer_error(pruned, q, h.H) < 0.5 * layer_error(pruned, rtn_quantize(pruned, fmt).dequantize(), h.H)


@pytest.mark.parametrize("pruning, method", [("magnitude", "gptq"), ("sparsegpt", "gptq"), ("wanda", "rtn")])
def test_joint_database_keeps_the_zeros(llama, pruning, method):
    arch = architecture(llama)
    spec = space("sparsity-quant", pruning=pruning, method=method, sparsity=[0.0, 0.5], bits=[3, 8], group_size=16)
    problem = spec.materialize(arch, 0.3)
    database = Database()
    build_database(llama, arch, problem, database, sequences(), batch_size=2, progress=False)
    dense = {k: v.clone() for k, v in llama.state_dict().items()}
    candidate = CandidateModel(llama, arch, problem, database)
    for level in problem.space.units[0].levels:
        candidate.apply({u.name: level for u in problem.space.units})
        for unit in problem.space.units:
            zeros, bits = problem.level(unit.name, level).zeros, problem.level(unit.name, level).bits
            W_hat = arch.module(unit.name).weight
            assert int((W_hat == 0).sum()) >= zeros
            assert int(distinct_per_group(W_hat, 16).max()) <= 2**bits
            if pruning == "magnitude" and zeros:  # the mask is known without the Hessian
                assert (W_hat[magnitude_prune(dense[f"{unit.name}.weight"], 0.5) == 0] == 0).all()
        counted = problem.compression.measure(arch, problem, candidate.levels())
        planned = problem.space.usage({u.name: level for u in problem.space.units}, problem.budget)
        assert counted["fp16_fraction"] <= planned + 1e-12  # rounding may zero more weights, never fewer
    candidate.restore()
    assert all(torch.equal(dense[k], v) for k, v in llama.state_dict().items())


def test_evopress_in_the_joint_space_spends_the_byte_budget(llama):
    # Level switches here change bytes unevenly: EvoPress drops children over the budget
    # and keeps those under it. With a fitness that falls with bytes at unit-specific
    # rates (so the best allocation is not uniform), the search must end at the budget.
    problem = space("sparsity-quant", sparsity=[0.0, 0.5], bits=[2, 3, 4, 8]).materialize(architecture(llama), 0.2)
    sp, budget = problem.space, problem.budget
    sensitivity = np.random.default_rng(0).uniform(0.1, 10, len(sp.units))

    def fitness(assignment):
        return float(sum(s * np.exp(-20 * u.resources["fp16_fraction"][u.levels.index(assignment[u.name])])
                         for s, u in zip(sensitivity, sp.units)))

    result = search(sp, fitness, budget, sampler="evopress", seed=0, progress=False,
                    sampler_options={"offspring": 16, "generations": 60})
    uniform = search(sp, fitness, budget, sampler="uniform", progress=False)
    used = budget.usage(sp, result.best.assignment)
    share = max(u.size for u in sp.units) / sum(u.size for u in sp.units)
    assert 0.2 - 0.1 * share < used <= 0.2 + 1e-12  # within a tenth of a level step of the largest layer
    assert result.best.value < 0.9 * uniform.best.value


def test_ready_quant_spaces_load_and_validate(tmp_path):
    assert CompressionSpace.load("quant").compression.group_size >= 64  # see spaces/quant.yaml on GGUF grids
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"compression": {"kind": "quantization", "bits": [1, 4]},
                                   "budget": {"resource": "bits", "form": "max_average"}}))
    with pytest.raises(EvosearchError, match="compression.bits: .*from 2 to 8"):
        CompressionSpace.load(bad)
    bad.write_text(json.dumps({"compression": {"kind": "sparsity-quant", "sparsity": [0.5, 1.0]},
                               "budget": {"resource": "fp16_fraction", "form": "max_average"}}))
    with pytest.raises(EvosearchError, match=r"sparsity must be distinct fractions in \[0, 1\)"):
        CompressionSpace.load(bad)


def test_database_identity_holds_the_format(tmp_path, llama):
    arch = architecture(llama)
    corpus = SimpleNamespace(calibration=np.arange(10))
    settings = SearchSettings(space="quant", budget=3, database=str(tmp_path))
    open_database(settings, space("quant").materialize(arch, 3), "model", corpus)
    open_database(settings, space("quant", bits=[2, 3]).materialize(arch, 3), "model", corpus)  # keys hold bits
    for change in ({"group_size": 64}, {"symmetric": True}, {"act_order": True}, {"method": "rtn"}):
        with pytest.raises(EvosearchError, match="built for another model, method or calibration"):
            open_database(settings, space("quant", **change).materialize(arch, 3), "model", corpus)
    joint = SearchSettings(space="sparsity-quant", budget=0.3, database=str(tmp_path / "joint"))
    open_database(joint, space("sparsity-quant").materialize(arch, 0.3), "model", corpus)
    open_database(joint, space("sparsity-quant", sparsity=[0.0, 0.7]).materialize(arch, 0.3), "model", corpus)
    with pytest.raises(EvosearchError, match="built for another model, method or calibration"):
        open_database(joint, space("sparsity-quant", pruning="wanda").materialize(arch, 0.3), "model", corpus)


@pytest.mark.real
def test_quant_search_end_to_end_on_the_packaged_model(real, tmp_path, capsys):
    from evosearch.cli import main

    spec = tmp_path / "quant.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "quant-rtn", "compression": {"kind": "quantization", "method": "rtn", "bits": [3, 4], "group_size": 128},
        "budget": {"resource": "bits", "form": "max_average"}, "baselines": ["uniform"]}))
    out = tmp_path / "out"
    assert main(["search", str(spec), "--budget", "3.5", "--generations", "1", "--offspring", "2",
                 "--calibration-sequences", "2", "--sequence-length", "64", "--fidelities", "128",
                 "--eval-tokens", "1024", "--database", str(tmp_path / "db"), "--out", str(out)]) == 0
    assert "bits per weight on average" in capsys.readouterr().out
    report = json.loads((out / "result.json").read_text())
    from evosearch.heal import what_to_keep
    from evosearch.run import RunResult

    result = RunResult.load(out / "result.json")
    budget, uniform = report["budget"], report["baselines"]["uniform"]
    assert budget["label"] == "max_average bits"
    assert budget["measured"] == pytest.approx(budget["planned"])
    assert 3.45 < budget["planned"] <= 3.5  # the closest mix under 3.5
    assert set(report["assignment"].values()) == {3, 4}
    assert uniform["usage"] == pytest.approx(budget["planned"])  # EvoPress switches keep the start's bits
    assert report["fitness"]["kl"] <= uniform["kl"]  # the search starts from the uniform mix and keeps the best
    assert report["perplexity"]["compressed"] > report["perplexity"]["dense"]
    assert report["quantization"]["fp16_fraction"] == pytest.approx(report["quantization"]["bytes"] / (2 * 106168320))
    # healing reads the applied formats: one per searched layer, the bits the assignment chose
    formats = report["formats"]
    assert {name: f["bits"] for name, f in formats.items()} == report["assignment"]
    assert all(f["group_size"] == 128 and f["zeros"] == 0 for f in formats.values())
    assert set(what_to_keep(result, architecture(real[0])).formats) == set(formats)  # heal keeps every format


def test_joint_export_writes_what_packed_bytes_counts_and_bitmask_layers_reload_exactly(llama, tmp_path):
    from safetensors.torch import load_file

    from evosearch.export import ExportJob, export_model
    from evosearch.kernels.quant import pack
    from evosearch.layouts import expand_bitmask, unpack_mask
    from evosearch.runtime import load_exported

    arch = architecture(llama)
    problem = space("sparsity-quant", pruning="magnitude", method="rtn", group_size=16, sparsity=[0.0, 0.5],
                    bits=[3, 4]).materialize(arch, 0.3)
    database = Database()
    build_database(llama, arch, problem, database, sequences(), batch_size=2, progress=False)
    units = problem.space.units
    levels = ["0%@4bit", "50%@4bit", "0%@3bit", "50%@3bit"]
    assert set(units[0].levels) == set(levels)
    assignment = {u.name: levels[i % 4] for i, u in enumerate(units)}  # dense and sparse levels mixed
    candidate = CandidateModel(llama, arch, problem, database)
    candidate.apply(assignment)
    ids = sequences(2, 24, seed=4)
    with torch.no_grad():
        expected = llama(ids).logits
    job = ExportJob.for_problem(llama, problem, assignment)
    sparse = {u.name for u in units if assignment[u.name].startswith("50%")}
    assert set(job.quantized) == set(problem.model_units) and set(job.bitmask) == sparse
    report = export_model(job, tmp_path / "packed", format="packed")

    # evosearch's own file name: from_pretrained refuses the folder rather than load it with layers missing
    assert not (tmp_path / "packed" / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    tensors = load_file(str(tmp_path / "packed" / "evosearch-bitmask.safetensors"))
    comp = problem.spec.compression
    for unit in units:
        W, level = arch.module(unit.name).weight, unit.levels.index(assignment[unit.name])
        local = {k.removeprefix(f"{unit.name}."): v for k, v in tensors.items() if k.startswith(f"{unit.name}.")}
        written = sum(t.numel() * t.element_size() for t in local.values())
        fmt = problem.levels[unit.name][level].fmt
        kept = int(torch.count_nonzero(W))
        assert written == packed_bytes(tuple(W.shape), fmt, kept)  # exactly what the mask written costs
        assert written <= unit.resources["bytes"][level]  # the budget's count is an upper bound (any mask) ...
        # ... and here exact: magnitude pruning keeps the largest weights, none of which round to zero
        assert written == unit.resources["bytes"][level]
        assert ("weight_mask" in local) == (unit.name in sparse)
        if unit.name in sparse:  # the mask is the non-zeros; the codes come back exactly
            qw = job.quantized[unit.name]
            assert torch.equal(unpack_mask(local["weight_mask"], W.shape[1]), W.cpu() != 0)
            assert torch.equal(expand_bitmask(local, fmt), pack(qw.codes, fmt.bits))
    rest = sum(p.numel() * p.element_size() for n, p in llama.named_parameters() if not n.endswith("_proj.weight"))
    assert report.tensor_bytes == comp.measure(arch, problem, candidate.levels())["bytes"] + rest

    record, config = report.record, json.loads((tmp_path / "packed" / "config.json").read_text())
    assert record["bitmask"] == sorted(sparse) and set(record["packed"]) == set(problem.model_units)
    targets = {t for g in config["quantization_config"]["config_groups"].values() for t in g["targets"]}
    assert targets == set(problem.model_units) - sparse and sparse <= set(config["quantization_config"]["ignore"])
    assert not record["vllm"]["servable"] and "bitmask layout" in " ".join(record["vllm"]["reasons"])

    loaded, _ = load_exported(tmp_path / "packed", device="cpu")
    for name in sparse:
        qw = job.quantized[name]
        assert torch.equal(loaded.get_submodule(name).weight_packed, pack(qw.codes, qw.fmt.bits))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-4, atol=1e-5)
    candidate.restore()


def test_the_bitmask_layout_keeps_a_kept_weight_at_its_zero_point():
    """A mask may keep weights whose code is the zero point (a pruning mask does): they round-trip too."""
    from evosearch.kernels.quant import pack
    from evosearch.layouts import expand_bitmask, pack_quantized

    fmt = QuantFormat(3, 4)
    codes = torch.randint(0, 8, (3, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    zeros = torch.randint(0, 8, (3, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    keep = torch.rand(3, 10, generator=torch.Generator().manual_seed(2)) < 0.3
    codes = torch.where(keep, codes, zeros[:, fmt.group_index(10)])  # masked weights are zero
    keep[0, 0], codes[0, 0] = True, zeros[0, 0]  # a kept weight rounded to zero
    qw = QuantizedWeight(codes, torch.rand(3, 3), zeros, fmt, torch.float32)
    tensors = pack_quantized(qw, keep)
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == packed_bytes((3, 10), fmt, int(keep.sum()))
    assert torch.equal(expand_bitmask(tensors, fmt), pack(codes, 3))
