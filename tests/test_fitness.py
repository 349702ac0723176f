"""The fitness's speed-ups (CUDA graphs, compiled blocks) give the values of the plain path.

A search changes its reference (the parent) every generation and its token count every
selection stage; the graphs and compiled code must stay right across both, since they
read weights and cached block inputs at fixed addresses.
"""

import shutil

import pytest
import torch

from evosearch.candidate import CandidateModel
from evosearch.compression import CompressionSpace
from evosearch.evaluate import Teacher
from evosearch.fitness import KLFitness
from evosearch.units import architecture
from conftest import tiny_llama


def generations(names: list[str], count: int = 3) -> list[list[dict]]:
    """Batches of drop assignments around a parent that changes every generation."""
    batches, parent = [], {name: "keep" for name in names}
    for g in range(count):
        children = [dict(parent, **{names[(g + i) % len(names)]: "drop"}) for i in range(3)]
        children.append(dict(children[0], **{names[-1]: "drop"}))
        batches.append([parent, *children])
        parent = children[0] if g % 2 == 0 else {name: "keep" for name in names}
    return batches


def fitness_values(model, device: str, **options) -> list[list[float]]:
    model = model.to(device)
    arch = architecture(model)
    problem = CompressionSpace.load("drop").materialize(arch, 0.25)
    ids = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(0))
    teacher = Teacher.build(model, ids, progress=False)
    fitness = KLFitness(CandidateModel(model, arch, problem, None), teacher, batch_size=4, **options)
    values = []
    for batch in generations([u.name for u in problem.space.units]):
        for tokens in (64, None, 64):  # the same (batch, start block) recurs: the second time is captured
            values.append(fitness.evaluate_batch(batch, tokens))
    fitness.candidate.restore()
    return values, fitness


@pytest.mark.gpu
def test_cuda_graphs_give_the_eager_values_across_references_and_token_counts():
    model = tiny_llama(layers=4)
    eager, _ = fitness_values(model, "cuda", cuda_graphs=False)
    graphs, fitness = fitness_values(model, "cuda", cuda_graphs=True)
    assert fitness.cuda_graphs and len(fitness._graphs) > 4  # captured, and not given up on
    for e, g in zip(eager, graphs):
        assert g == pytest.approx(e, rel=1e-5, abs=1e-9)
    assert eager[0][0] == pytest.approx(0, abs=1e-5) and all(v > 0 for v in eager[0][1:])


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile needs a C++ compiler")
def test_compiled_blocks_give_the_eager_values():
    import torch._dynamo

    model = tiny_llama(layers=2)
    eager, _ = fitness_values(model, "cpu")
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled, _ = fitness_values(model, "cpu", compile_blocks=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before  # it did compile
    for e, c in zip(eager, compiled):
        assert c == pytest.approx(e, rel=1e-4, abs=1e-7)


def test_the_reference_runs_only_as_deep_as_the_batch_needs_and_extends_later():
    """Blocks past a batch's latest first difference are not run for the reference; a later batch
    with the same reference that needs them runs only those. Values equal the run without reuse."""
    model = tiny_llama(layers=4)
    arch = architecture(model)
    problem = CompressionSpace.load("drop").materialize(arch, 0.25)
    names = [u.name for u in problem.space.units]  # attention and MLP of each block, in block order
    block = {u.name: problem.model_units[u.name].block for u in problem.space.units}
    teacher = Teacher.build(model, torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0)),
                            progress=False)
    parent = {name: "keep" for name in names}
    early = [dict(parent, **{n: "drop"}) for n in names if block[n] <= 1]
    late = [dict(parent, **{n: "drop"}) for n in names if block[n] == 3] + [parent]
    plain = KLFitness(CandidateModel(model, arch, problem, None), teacher, batch_size=2, reuse_prefix=False)
    expected = [plain.evaluate_batch([a])[0] for a in early + late]

    fitness = KLFitness(CandidateModel(model, arch, problem, None), teacher, batch_size=2)
    runs = []
    run = fitness._run_block
    fitness._run_block = lambda blk, hidden, kwargs: runs.append(blk) or run(blk, hidden, kwargs)
    first = fitness.evaluate_batch(early)  # each drops one unit: the consensus is the parent
    reference_runs = len(runs) - sum(4 - block[n] for n in names if block[n] <= 1)
    assert fitness._reference[2] == 1 and reference_runs == 1  # block 0 only: its output is block 1's input
    runs.clear()
    second = fitness.evaluate_batch(late)
    assert fitness._reference[2] == 4 and len(runs) == 3 + 2  # blocks 1-3 for the reference, block 3 twice
    assert first + second == expected
