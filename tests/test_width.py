"""Sub-network (width) spaces: levels and budget, masks, reformation, export."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from evosearch import subnetwork
from evosearch.candidate import CandidateModel
from evosearch.compression import CompressionSpace
from evosearch.kinds import Dense, Drop, Width
from evosearch.kinds.base import Reformation
from evosearch.problem import BudgetSpec
from evosearch.blocks import capture_block_inputs, run_block
from evosearch.database.build import _hessian_hooks, build_database
from evosearch.database.hessian import layer_error
from evosearch.database.store import Database
from evosearch.errors import EvosearchError
from evosearch.evaluate import Teacher
from evosearch.export import ExportJob, export_model
from evosearch.fitness import KLFitness
from evosearch.space import Feasibility
from evosearch.units import architecture, count_parameters


@pytest.fixture
def smollm_shaped():
    """Random weights in SmolLM2-135M's block shapes (9 query / 3 KV heads of 64, 1536 MLP channels), 2 blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):  # shapes are all a space needs
        return LlamaForCausalLM(config)


def sequences(n=8, length=32, seed=0):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def width_space(name="width", **compression):
    spec = CompressionSpace.load(name)
    return spec.model_copy(update={"compression": spec.compression.model_copy(update=compression)})


def built(model, spec, budget, ids=None):
    arch = architecture(model)
    problem = spec.materialize(arch, budget)
    database = Database()
    build_database(model, arch, problem, database, sequences() if ids is None else ids, batch_size=4, progress=False)
    return arch, problem, CandidateModel(model, arch, problem, database)


def random_feasible(problem, seed):
    feasibility = Feasibility(problem.space, [problem.budget])
    rng = np.random.default_rng(seed)
    start = np.array([u.levels.index(0) for u in problem.space.units])
    x = feasibility.repair(rng.integers(0, problem.space.n_levels), rng, start)
    return problem.space.assignment(x)


def test_levels_start_at_the_uniform_width_and_switches_keep_parameters_exact(smollm_shaped):
    problem = width_space(granularity=64).materialize(architecture(smollm_shaped), 0.8)
    space, budget = problem.space, problem.budget
    uniform = {u.name: 0 for u in space.units}
    step = 64 * 3 * 576  # the parameters of 64 channels of gate, up and down_proj
    assert budget.is_met(space, uniform) and abs(budget.usage(space, uniform) - 0.8) <= step / 2 / space.sizes.sum()
    attention = [u for u in space.units if u.group == "attention"]
    mlp = [u for u in space.units if u.group == "mlp"]
    # 3 KV groups, at least one kept; 0.8 x 6 groups = 5 (rounded): one block keeps 2, the other 3
    assert sorted(u.levels for u in attention) == [[-1, 0, 1], [0, 1, 2]]
    assert len(mlp[0].levels) == 24 - 6 + 1  # 1536 channels in steps of 64, down to a quarter
    # uniform: every block within one step of the others
    kept = [problem.level(u.name, 0) for u in mlp]
    assert len(set(kept)) <= 2
    # a level switch between two blocks of one kind keeps the parameter count exactly
    a, b = mlp[0].name, mlp[1].name
    switched = dict(uniform, **{a: 1, b: -1})
    assert space.usage(switched, "params") == space.usage(uniform, "params")
    assert problem.level(a, 1) == Width(kept=problem.level(a, 0).kept - 64, of="channels")


def test_starts_trade_attention_for_mlp_and_evopress_starts_from_the_best(smollm_shaped):
    from evosearch import search

    problem = width_space(granularity=64).materialize(architecture(smollm_shaped), 0.8)
    space, budget = problem.space, problem.budget
    uniform = {u.name: 0 for u in space.units}
    assert uniform in problem.starts and all(budget.is_met(space, start) for start in problem.starts)
    attention = [u.name for u in space.units if u.group == "attention"]

    def attention_kept(assignment):
        return sum(space.unit(name).resources["params"][space.unit(name).levels.index(assignment[name])]
                   for name in attention)

    kept = sorted(attention_kept(start) for start in problem.starts)
    assert kept[-1] == 2 * 884736 and len(set(kept)) == len(kept)  # the widest keeps all heads of both blocks
    # a fitness that rewards attention: level switches alone cannot move parameters from the MLP to it
    result = search(space, lambda a: -attention_kept(a), budget, sampler="evopress", progress=False,
                    sampler_options={"starts": problem.starts, "generations": 1, "offspring": 2})
    assert attention_kept(result.best.assignment) == kept[-1]


def test_width_space_errors(llama):
    arch = architecture(llama)
    with pytest.raises(EvosearchError, match="granularity 48 does not divide the MLP's 128 channels"):
        width_space(granularity=48).materialize(arch, 0.8)
    with pytest.raises(EvosearchError, match=r"outside this space's range \[0\.5"):
        width_space(min_keep=0.5).materialize(arch, 0.3)
    bad = CompressionSpace.load("width").model_copy(update={"budget": BudgetSpec(resource="params", form="max_total")})
    with pytest.raises(EvosearchError, match="budget is {resource: kept, form: average}"):
        bad.materialize(arch, 0.8)


@pytest.mark.parametrize("fixture", ["llama", "opt"])
def test_masks_are_nested_importance_orders_and_parameters_match_the_plan(request, fixture):
    model = request.getfixturevalue(fixture)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    arch, problem, candidate = built(model, width_space("drop-width", granularity=32), 0.6)
    for seed in range(3):
        assignment = random_feasible(problem, seed)
        candidate.apply(assignment)
        units = list(problem.model_units.values())
        planned = problem.space.usage(assignment, "params")
        assert subnetwork.kept_parameters(arch, units) == planned  # counted from the weights
        for mu in units:
            kept = subnetwork.kept_groups(arch, mu)
            level = problem.level(mu.name, assignment[mu.name])
            count = len(kept) if level == Dense() else 0 if level == Drop() else level.kept
            assert int(kept.sum()) == count
            lay = subnetwork.layout(arch, mu)
            for name in lay.inputs:  # dead rows are zero too, so nothing non-zero is left unexported
                rows = kept.repeat_interleave(lay.rows[name])
                assert not arch.module(name).weight[~rows].any()
    # nested: a narrower level keeps a subset of a wider one's groups
    mu = problem.model_units[problem.space.units[1].name]
    masks = []
    for level in problem.space.unit(mu.name).levels:
        candidate.apply(dict(assignment, **{mu.name: level}))
        masks.append(subnetwork.kept_groups(arch, mu))
    assert all((narrow <= wide).all() for wide, narrow in zip(masks, masks[1:]))
    candidate.restore()
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())


def test_the_database_holds_each_blocks_importance_order(llama):
    arch, problem, candidate = built(llama, width_space(), 0.8)
    mu = problem.model_units["model.layers.0.mlp"]
    order = candidate.database.get(mu.name, "order")["order"]
    assert sorted(order.tolist()) == list(range(128))
    # the paper's scores, from the block's own Hessians, in that order
    hooks = _hessian_hooks(arch, 0)
    handles = [arch.module(n).register_forward_hook(h) for n, h in hooks["hooks"].items()]
    inputs = capture_block_inputs(llama, arch, sequences(), batch_size=4)
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
        run_block(arch.blocks[0], hidden, kwargs)
    for handle in handles:
        handle.remove()
    hessians = {n: h.H for n, h in hooks["per_linear"].items()}
    scores = subnetwork.importance(arch, mu, hessians)
    assert torch.equal(subnetwork.importance_order(scores), order)
    assert (scores[order][:-1] >= scores[order][1:]).all() and scores[order[0]] > scores[order[-1]]


def test_reformation_lowers_the_error_and_kl_of_the_same_mask_and_admm_meets_the_closed_form(llama):
    calibration = sequences(32)  # a random model's inputs are nearly uncorrelated: fewer tokens overfit
    arch, problem, candidate = built(llama, width_space(granularity=32), 0.6, calibration)
    teacher = Teacher.build(llama, sequences(16, seed=1), progress=False)  # held-out tokens
    uniform = {u.name: 0 for u in problem.space.units}
    units = list(problem.model_units.values())
    candidate.apply(uniform)
    widths = {mu.name: subnetwork.kept_groups(arch, mu) for mu in units}
    masked_kl = teacher.kl(llama)
    reformed = {}
    for reformation in (Reformation(method="closed_form"), Reformation(method="admm", iterations=100)):
        candidate.apply(uniform)
        record = subnetwork.reform_subnetwork(llama, arch, units, candidate.dense, calibration, reformation,
                                              batch_size=8, progress=False)
        candidate.mark_changed(problem.model_units)  # so that the next apply puts the masks back
        assert record["layers"] == sum(0 < int(w.sum()) < len(w) for w in widths.values())
        assert record["error_after"] < 0.6 * record["error_before"]
        assert teacher.kl(llama) < 0.85 * masked_kl
        assert all(torch.equal(subnetwork.kept_groups(arch, mu), widths[mu.name]) for mu in units)  # same mask
        reformed[reformation.method] = {mu.name: arch.module(subnetwork.layout(arch, mu).output).weight.clone()
                                        for mu in units}
    for name, exact in reformed["closed_form"].items():
        assert (reformed["admm"][name] - exact).norm() < 0.02 * exact.norm(), name
    candidate.apply(uniform)
    assert teacher.kl(llama) == pytest.approx(masked_kl, rel=1e-6)


def test_reformed_fitness_scores_the_closed_form_levels(llama):
    arch, problem, candidate = built(llama, width_space(granularity=32, fitness="reformed"), 0.6, sequences(32))
    teacher = Teacher.build(llama, sequences(16, seed=1), progress=False)
    fitness = KLFitness(candidate, teacher)
    uniform = {u.name: 0 for u in problem.space.units}
    reformed = fitness(uniform)
    candidate.end_search()  # from here on the levels are masks (the final sub-network is reformed afterwards)
    assert reformed < 0.85 * fitness(uniform)
    candidate.searching = True
    candidate.mark_changed(problem.model_units)
    fitness(uniform)
    narrowed = [mu for mu in problem.model_units.values() if isinstance(problem.level(mu.name, 0), Width)]
    assert narrowed
    for mu in narrowed:
        output = subnetwork.layout(arch, mu).output
        stored = candidate.database.get(mu.name, problem.level(mu.name, 0).key)[f"{output}.weight"]
        assert torch.equal(arch.module(output).weight, stored)


def export_width(model, problem, folder):
    """Export a copy of ``model`` (export slices the layers in place); returns export_model's report."""
    import copy

    exported = copy.deepcopy(model)
    job = ExportJob(exported, architecture(exported), problem.compression, {u: Dense() for u in problem.model_units})
    job.kind.export(job)  # widths are read from the weights
    return export_model(job, folder)


def block_sizes(report, model):
    """Per exported block: (query heads, KV heads, MLP channels), 0 for a removed sub-block."""
    config = model.config
    sizes = []
    for overrides in report.record["blocks"]["overrides"]:
        skip = overrides.get("skip", [])
        sizes.append((0 if "self_attn" in skip else overrides.get("num_attention_heads", config.num_attention_heads),
                      0 if "self_attn" in skip else overrides.get("num_key_value_heads", config.num_key_value_heads),
                      0 if "mlp" in skip else overrides.get("intermediate_size", config.intermediate_size)))
    return sizes


LOAD_IN_A_FRESH_PROCESS = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
generated = model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
torch.save({"logits": logits, "generated": generated, "class": type(model).__module__,
            "parameters": sum(p.numel() for p in model.parameters())}, sys.argv[3])
"""


def test_export_removes_heads_channels_and_blocks_and_loads_with_from_pretrained(llama, tmp_path):
    arch, problem, candidate = built(llama, width_space("drop-width", granularity=32), 0.55)
    assignment = {u.name: 0 for u in problem.space.units}
    assignment["model.layers.0.self_attn"] = problem.space.unit("model.layers.0.self_attn").levels[-1]  # removed
    assignment["model.layers.1.self_attn"] = problem.space.unit("model.layers.1.self_attn").levels[0]  # widened
    assert problem.budget.is_met(problem.space, assignment)
    candidate.apply(assignment)
    subnetwork.reform_subnetwork(llama, arch, list(problem.model_units.values()), candidate.dense, sequences(),
                                 Reformation(iterations=5), batch_size=4, progress=False)
    report = export_width(llama, problem, tmp_path / "model")
    sizes = block_sizes(report, llama)
    assert sizes[0][:2] == (0, 0) and sizes[1][1] == 2

    # transformers alone, in a process that never imported evosearch, runs the saved modeling file
    ids = sequences(2, 24, seed=3)
    torch.save(ids, tmp_path / "ids.pt")
    done = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(tmp_path / "model"),
                           str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["class"].startswith("transformers_modules.")
    planned = problem.space.usage(assignment, "params")
    dense_units = sum(mu.params for mu in problem.model_units.values())
    removed_norms = llama.config.hidden_size * sum(n == 0 for size in sizes for n in (size[0], size[2]))
    assert out["parameters"] == report.parameters == count_parameters(llama) - dense_units + planned - removed_norms
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], llama(ids).logits, rtol=1e-4, atol=1e-5)
    # greedy generation with a cache whose first block has no attention
    prompt = ids[:1, :5]
    assert torch.equal(out["generated"], llama.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0))


def test_evosearch_loads_an_export_with_its_own_code(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from evosearch.model import _register_exported_classes

    arch, problem, candidate = built(llama, width_space(granularity=32), 0.6)
    candidate.apply({u.name: 0 for u in problem.space.units})
    export_width(llama, problem, tmp_path)
    (tmp_path / "modeling_evosearch.py").write_text("raise RuntimeError('the copy in the folder ran')\n")
    _register_exported_classes()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__module__ == "evosearch.modeling_evosearch"
    ids = sequences(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, llama(ids).logits, rtol=1e-4, atol=1e-5)


def test_export_refuses_other_model_types(opt, tmp_path):
    _, problem, candidate = built(opt, width_space(granularity=32), 0.8)
    candidate.apply({u.name: 0 for u in problem.space.units})
    with pytest.raises(EvosearchError, match="supports model types llama, not 'opt'"):
        export_width(opt, problem, tmp_path)


def test_sparsity_database_can_reform_each_pruned_layer(llama, tmp_path):
    path = tmp_path / "magnitude-reform.yaml"
    path.write_text("compression: {kind: sparsity, method: magnitude, levels: [0.5], "
                    "reform: {method: admm, iterations: 20}}\nbudget: {resource: sparsity}\n")
    reformed_spec = CompressionSpace.load(path)
    plain_spec = reformed_spec.model_copy(
        update={"compression": reformed_spec.compression.model_copy(update={"reform": None})})
    arch = architecture(llama)
    ids = sequences()
    weights = {}
    for name, spec in (("plain", plain_spec), ("reformed", reformed_spec)):
        problem = spec.materialize(arch, 0.5)
        database = Database()
        build_database(llama, arch, problem, database, ids, batch_size=4, progress=False)
        weights[name] = {u: database.get(u, problem.level(u, 0.5).key)[f"{u}.weight"] for u in problem.model_units}
    hooks = _hessian_hooks(arch, 0)  # block 0 sees the same inputs whatever the database
    handles = [arch.module(n).register_forward_hook(h) for n, h in hooks["hooks"].items()]
    with torch.no_grad():
        llama.model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    for name, h in hooks["per_linear"].items():
        W = arch.module(name).weight
        plain, reformed = weights["plain"][name], weights["reformed"][name]
        assert torch.equal(plain == 0, reformed == 0)  # the same mask, the same number of zeros
        assert layer_error(W, reformed, h.H) < 0.9 * layer_error(W, plain, h.H), name


def test_unstructured_reformation_must_be_admm(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("compression: {kind: sparsity, reform: {method: closed_form}}\nbudget: {resource: sparsity}\n")
    with pytest.raises(EvosearchError, match="use method: admm"):
        CompressionSpace.load(path)


@pytest.mark.real
def test_real_sub_network_reforms_and_exports(real, brown, tmp_path):
    from transformers import AutoModelForCausalLM

    model = real[0]
    arch = architecture(model)
    problem = width_space().materialize(arch, 0.8)
    database = Database()
    build_database(model, arch, problem, database, brown.calibration_sequences(2, 128, seed=0), progress=False)
    candidate = CandidateModel(model, arch, problem, database)
    teacher = Teacher.build(model, brown.calibration_sequences(2, 128, seed=1), progress=False)
    # the first two blocks narrowed (one KV group and a third of the channels removed), the rest dense,
    # so that reformation runs on two blocks only
    narrowed = {"model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"}
    assignment = {}
    for unit in problem.space.units:
        names = [level.name for level in problem.levels[unit.name]]
        keep = ("kv_heads=2" if "self_attn" in unit.name else "channels=1024") if unit.name in narrowed else "dense"
        assignment[unit.name] = unit.levels[names.index(keep)]
    try:
        candidate.apply(assignment)
        masked_kl = teacher.kl(model)
        units = list(problem.model_units.values())
        record = subnetwork.reform_subnetwork(model, arch, units, candidate.dense,
                                              brown.calibration_sequences(16, 128, seed=2),
                                              Reformation(method="closed_form"), batch_size=8, progress=False)
        candidate.mark_changed(problem.model_units)
        assert record["layers"] == 4 and record["error_after"] < 0.5 * record["error_before"]
        assert teacher.kl(model) < 0.8 * masked_kl
        report = export_width(model, problem, tmp_path)
        assert block_sizes(report, model)[:3] == [(6, 2, 1024), (6, 2, 1024), (9, 3, 1536)]
        exported = AutoModelForCausalLM.from_pretrained(tmp_path)  # evosearch's class, registered by load_model
        planned = problem.space.usage(assignment, "params")
        assert count_parameters(exported) == count_parameters(model) - sum(mu.params for mu in units) + planned
        ids = brown.calibration_sequences(1, 64, seed=3)
        with torch.no_grad():
            torch.testing.assert_close(exported(ids).logits, model(ids).logits, rtol=1e-3, atol=1e-3)
    finally:
        candidate.restore()
