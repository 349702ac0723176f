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
