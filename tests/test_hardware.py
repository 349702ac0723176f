"""Hardware tables: measured units as budget resources, and a prediction the export meets."""

import copy
import os
import statistics

import pytest
import torch

from conftest import tiny_llama, tiny_opt
from evosearch import search
from evosearch.cli import parse_budget
from evosearch.compression import CompressionSpace
from evosearch.errors import EvosearchError
from evosearch.export import ExportJob, export_model
from evosearch.hardware import (HardwareTable, Timer, Workload, attach, budget_for, latency_classes, measure_model,
                                profile)
from evosearch.kinds import Width
from evosearch.runtime import load_exported
from evosearch.units import architecture

WORKLOAD = Workload(batch=1, prompt=16, new_tokens=8)


@pytest.fixture
def one_thread():
    """Two cores shared by many jobs: OpenMP threads waiting on each other would time the machine, not the model.

    Timings say nothing on a machine busier than its cores (other jobs running): skipped then."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 1.5 * cores:
        pytest.skip(f"load average {load:.1f} on {cores} cores: too busy to time the models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    return tiny_llama(layers=6)


def test_latency_classes_follow_what_an_export_runs(model):
    """A level's latency class is what its export runs, its whole format included."""
    arch = architecture(model)
    sparse = CompressionSpace.load("sparsity").model_copy(update={"compression": CompressionSpace.load(
        "sparsity-2of4").compression.model_copy(update={"levels": [0.0, 0.5, "4:8", "2:4"]})})
    kind = sparse.compression
    problem = sparse.materialize(arch, 0.4)
    unit = problem.space.units[0].name
    assert [kind.latency_class(level).name for level in problem.levels[unit]] == ["dense", "dense", "dense", "2:4"]
    quant = CompressionSpace.load("sparsity-quant")
    quant = quant.model_copy(update={"compression": quant.compression.model_copy(
        update={"group_size": 64, "symmetric": True})}).materialize(arch, 0.3)
    classes = {quant.compression.latency_class(level).name for level in quant.levels[unit]}
    assert classes == {f"bits={b},group=64,sym" for b in (2, 3, 4, 5, 6, 8)}  # pruned levels run packed, format kept
    assert [c.name for c in latency_classes(("dense", "2:4", "bits=4", "bits=8,group=row"))] == [
        "dense", "2:4", "bits=4", "bits=8,group=row"]
    with pytest.raises(EvosearchError, match="not a level name"):
        latency_classes(("heads=3",))
    with pytest.raises(EvosearchError, match="no latency model"):
        Width(kept=1, of="kv_heads").runtime_module(arch, arch.units("attention")[0], torch.device("cpu"))


def test_budget_names_parse_and_bad_ones_fail():
    assert parse_budget("0.25") == (None, 0.25) and parse_budget("latency_ms=7.5") == ("latency_ms", 7.5)
    for text in ("speed=3", "latency_ms=fast"):
        with pytest.raises(EvosearchError):
            parse_budget(text)


def test_latency_budget_search_gives_an_export_whose_measured_latency_is_predicted(model, tmp_path, one_thread):
    timer = Timer(torch.device("cpu"), repeats=5, warmup=1)
    table = profile(model, "cpu", WORKLOAD, classes=latency_classes(("dense", "2:4", "bits=4,group=32,sym")),
                    timer=timer, progress=False)
    table = HardwareTable.load(table.save(tmp_path / "table.json"))
    arch = architecture(model)
    assert set(table.units) == {u.name for u in arch.units()}
    q = table.units["model.layers.0.self_attn.q_proj"]
    assert q["2:4"]["decode_ms"] == q["dense"]["decode_ms"]  # no semi-structured kernels on a CPU: dense speed
    assert q["bits=4,group=32,sym"]["bytes"] < q["dense"]["bytes"] / 6

    problem = attach(CompressionSpace.load("drop").materialize(arch, None), table)
    dense = {u.name: "keep" for u in problem.space.units}
    rest = table.rest(problem, "decode_ms")
    limit = rest + 0.6 * (table.predict(problem, dense) - rest)  # 40% of the blocks' time must go
    budget = budget_for("latency_ms", limit, problem, table)
    problem = problem.with_budget(budget)
    with pytest.raises(EvosearchError, match="under what the model costs outside"):
        budget_for("latency_ms", rest / 2, problem, table)

    # A stand-in fitness: dropping late blocks costs less (the search itself is tested elsewhere).
    index = {u.name: i for i, u in enumerate(problem.space.units)}
    result = search(problem.space, lambda a: sum(1 / (1 + index[u]) for u, level in a.items() if level == "drop"),
                    budget, sampler="evopress", seed=0, progress=False,
                    sampler_options={"offspring": 8, "generations": 5})
    best = result.best.assignment
    predicted = table.predict(problem, best)
    assert predicted <= limit * (1 + 1e-9)

    dense_model = copy.deepcopy(model)
    with torch.no_grad():
        for unit, level in best.items():
            if level == "drop":
                mu = problem.model_units[unit]
                linears = arch.attention_linears if mu.kind == "attention" else arch.mlp_linears
                arch.module(linears(mu.block)[1]).weight.zero_()
    job = ExportJob.for_problem(model, problem, best)
    export_model(job, tmp_path / "out")
    exported, _ = load_exported(tmp_path / "out", device="cpu")
    # A busy shared CPU: the two models are timed in turns (the fastest repetitions of each turn), the turns'
    # medians compared, since one turn can land in a quiet or a busy moment, and the prediction checked loosely
    # (within 10% on the GPU: benchmarks/RESULTS.md).
    fastest = Timer(torch.device("cpu"), repeats=3, warmup=1, statistic=min)
    measured = {"dense": [], "export": []}
    for _ in range(5):
        for name, m in (("dense", dense_model), ("export", exported)):
            measured[name].append(measure_model(m, WORKLOAD, fastest)["decode_ms"])
    ratio = statistics.median(measured["export"]) / statistics.median(measured["dense"])
    assert 0.6 < ratio / (predicted / table.predict(problem, dense)) < 1.4, (measured, predicted)


def test_profile_times_every_unit_of_an_opt_model():
    """Norm names and positions come from the family table, so a model laid out like OPT profiles too."""
    opt = tiny_opt(layers=2)
    timer = Timer(torch.device("cpu"), repeats=1, warmup=0)
    table = profile(opt, "cpu", WORKLOAD, classes=latency_classes(("dense", "bits=4,group=32,sym")), timer=timer,
                    progress=False)
    arch = architecture(opt)
    assert set(table.units) == {u.name for u in arch.units()}
    assert all(cost["decode_ms"] > 0 for unit in table.units.values() for cost in unit.values())
    assert set(table.base) == {"block", "attention+mlp", "linear"}
def test_a_file_that_is_not_a_table_names_its_first_problem(tmp_path):
    path = tmp_path / "table.json"
    path.write_text('{"target": "cpu", "device": "x"}')  # JSON, but 8 fields short of a table
    with pytest.raises(EvosearchError, match=r"^hardware table .*table.json: dtype: Field required \(8 problems in all\); "
                                             r"pass a table that `evosearch profile` wrote$"):
        HardwareTable.load(path)
    path.write_text('{"targt": "cpu"}')
    with pytest.raises(EvosearchError, match=r"table.json: targt: unknown field \(11 problems"):
        HardwareTable.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(EvosearchError, match=r"table.json: Input should be an object"):
        HardwareTable.load(path)
