import pytest
import torch

from evosearch.candidate import CandidateModel
from evosearch.compression import CompressionSpace
from evosearch.blocks import capture_block_inputs, run_block
from evosearch.database.build import build_database
from evosearch.database.store import Database
from evosearch.errors import EvosearchError
from evosearch.evaluate import Teacher
from evosearch.fitness import KLFitness
from evosearch.units import architecture


def sequences(n=4, length=32, seed=0):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def test_block_by_block_propagation_reproduces_the_model(llama):
    arch = architecture(llama)
    ids = sequences()
    inputs = capture_block_inputs(llama, arch, ids, batch_size=2)
    hidden = inputs.hidden
    for block in arch.blocks:
        hidden = [run_block(block, h, kw) for h, kw in zip(hidden, inputs.kwargs)]
    expected = llama.model(ids).last_hidden_state
    assert torch.allclose(llama.model.norm(torch.cat(hidden)), expected, atol=1e-5)


@pytest.mark.parametrize("fixture", ["llama", "opt"])
def test_sparsity_database_levels_are_exact_and_swaps_are_reversible(request, tmp_path, fixture):
    model = request.getfixturevalue(fixture)
    arch = architecture(model)
    problem = CompressionSpace.load("sparsity").materialize(arch, 0.5)
    database = Database(tmp_path / "db", identity={"test": 1})
    build_database(model, arch, problem, database, sequences(), batch_size=2, progress=False)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    candidate = CandidateModel(model, arch, problem, database)
    space = problem.space
    top = {u.name: u.levels[-1] for u in space.units}
    assert candidate.apply(top) == len(space.units)
    for unit in space.units:
        weight = arch.module(unit.name).weight
        zeros = round(unit.resources["sparsity"][-1] * unit.size)
        assert int((weight == 0).sum()) == zeros  # counted from the weights
    assert candidate.apply(top) == 0  # nothing changed, nothing copied
    candidate.restore()
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())  # bit-identical
    # statistics for the heuristic baselines
    ratios = database.stats[arch.block_name(0)]["outlier_ratios"]
    assert set(ratios) == {"3", "5", "7", "10"} and 1 > ratios["3"] > ratios["5"] > ratios["7"] >= ratios["10"] >= 0
    assert database.stats[f"{arch.block_name(1)}.{arch.family.attention}"]["block_influence"] > 0


def test_database_refuses_another_identity_and_reports_corrupt_entries(tmp_path):
    db = Database(tmp_path, identity={"model": "a"})
    db.put("unit", "zeros=3", {"unit.weight": torch.ones(2, 2)})
    assert torch.equal(Database(tmp_path, identity={"model": "a"}).get("unit", "zeros=3")["unit.weight"],
                       torch.ones(2, 2))
    with pytest.raises(EvosearchError, match="built for another model"):
        Database(tmp_path, identity={"model": "b"})
    (tmp_path / "unit" / "zeros=3.safetensors").write_bytes(b"garbage")
    with pytest.raises(EvosearchError, match="corrupt"):
        db.get("unit", "zeros=3")


def test_drop_levels_zero_the_output_projection_and_kl_grows(llama):
    arch = architecture(llama)
    problem = CompressionSpace.load("drop").materialize(arch, 0.25)
    candidate = CandidateModel(llama, arch, problem, None)
    teacher = Teacher.build(llama, sequences(), progress=False)
    fitness = KLFitness(candidate, teacher)
    keep = {u.name: "keep" for u in problem.space.units}
    assert fitness(keep) == pytest.approx(0, abs=1e-6)
    one = dict(keep, **{"model.layers.1.mlp": "drop"})
    two = dict(one, **{"model.layers.0.self_attn": "drop"})
    assert 0 < fitness(one) < fitness(two)
    assert not llama.model.layers[0].self_attn.o_proj.weight.any()
    assert llama.model.layers[0].self_attn.q_proj.weight.any()  # only the output projection is zeroed
    assert fitness(keep) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("fixture", ["llama", "opt"])
def test_fast_fitness_equals_the_reference_kl(request, fixture):
    """Block-by-block runs with prefix reuse give the same KL as a plain forward of each candidate."""
    model = request.getfixturevalue(fixture)
    arch = architecture(model)
    problem = CompressionSpace.load("drop").materialize(arch, 0.25)
    teacher = Teacher.build(model, sequences(n=5), progress=False)
    fitness = KLFitness(CandidateModel(model, arch, problem, None), teacher, batch_size=2)
    names = [u.name for u in problem.space.units]
    parent = {name: "keep" for name in names}
    batch = [parent, dict(parent, **{names[-1]: "drop"}), dict(parent, **{names[1]: "drop"}),
             dict(parent, **{names[0]: "drop", names[-2]: "drop"})]
    for tokens in (64, None):
        fast = fitness.evaluate_batch(batch, tokens)
        for assignment, value in zip(batch, fast):
            fitness.candidate.apply(assignment)
            assert value == pytest.approx(teacher.kl(model, tokens=tokens, batch_size=2), rel=1e-6, abs=1e-9)
    assert fast[0] == pytest.approx(0, abs=1e-6) and all(v > 0 for v in fast[1:])


def test_a_space_of_n_m_levels_only_builds_with_sparsegpt(llama):
    """sparsity-2of4 asks SparseGPT for no unstructured level at all (it once failed on that empty sweep)."""
    from evosearch.database.sparsity import nm_mask_ok

    arch = architecture(llama)
    problem = CompressionSpace.load("sparsity-2of4").materialize(arch, 0.25)
    database = Database()
    build_database(llama, arch, problem, database, sequences(), batch_size=2, progress=False)
    candidate = CandidateModel(llama, arch, problem, database)
    candidate.apply({u.name: "2:4" for u in problem.space.units})
    for unit in problem.space.units:
        weight = arch.module(unit.name).weight
        assert nm_mask_ok(weight, (2, 4)) and int((weight == 0).sum()) == weight.numel() // 2
    candidate.restore()
