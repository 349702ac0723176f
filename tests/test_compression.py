import pytest
import torch

from evosearch.compression import CompressionSpace, ready_spaces
from evosearch.errors import EvosearchError
from evosearch.kinds import NM, Dense, Sparse
from evosearch.units import architecture


def test_ready_spaces_load():
    assert {"sparsity", "sparsity-2of4", "drop"} <= set(ready_spaces())
    for name in ready_spaces():
        assert CompressionSpace.load(name).name == name


def test_sparsity_levels_step_by_equal_numbers_of_weights(llama):
    problem = CompressionSpace.load("sparsity").materialize(architecture(llama), 0.5)
    space = problem.space
    assert len(space.units) == 2 * 7
    steps = set()
    for unit in space.units:
        zeros = [round(s * unit.size) for s in unit.resources["sparsity"]]
        steps |= {b - a for a, b in zip(zeros, zeros[1:])}
        assert 0 in unit.levels  # the uniform level
        assert unit.resources["sparsity"][unit.levels.index(0)] == pytest.approx(0.5, abs=1 / unit.size)
    assert len(steps) == 1  # one step, in weights, for every layer
    uniform = {u.name: 0 for u in space.units}
    assert problem.budget.is_met(space, uniform)
    # a level switch between two layers of different size keeps the budget exactly
    a, b = space.units[0], space.units[-1]
    assert a.size != b.size
    switched = dict(uniform, **{a.name: 1, b.name: -1})
    assert problem.budget.usage(space, switched) == pytest.approx(problem.budget.usage(space, uniform), abs=1e-12)
    assert problem.level(a.name, 1) == Sparse(zeros=round(a.resources["sparsity"][a.levels.index(1)] * a.size))


def test_nm_and_drop_spaces(llama):
    arch = architecture(llama)
    nm = CompressionSpace.load("sparsity-2of4").materialize(arch, 0.4)
    assert nm.space.units[0].levels == [0.0, "2:4"] and nm.levels[nm.space.units[0].name] == [Dense(), NM(n=2, m=4)]
    drop = CompressionSpace.load("drop").materialize(arch, 0.25)
    assert [u.name for u in drop.space.units][:2] == ["model.layers.0.self_attn", "model.layers.0.mlp"]
    assert drop.budget.total == 1  # a quarter of 4 blocks


def test_space_errors(tmp_path, llama):
    with pytest.raises(EvosearchError, match="ready spaces: .*sparsity"):
        CompressionSpace.load("no-such-space")
    typo = tmp_path / "typo.yaml"
    typo.write_text("compression: {kind: sparsity, methd: wanda}\nbudget: {resource: sparsity}\n")
    with pytest.raises(EvosearchError, match="compression.methd: unknown field"):
        CompressionSpace.load(typo)
    bad_level = tmp_path / "bad.yaml"
    bad_level.write_text("compression: {kind: sparsity, levels: [0.0, '5:4']}\nbudget: {resource: sparsity}\n")
    with pytest.raises(EvosearchError, match="not an N:M pattern"):
        CompressionSpace.load(bad_level)
    with pytest.raises(EvosearchError, match="outside this space's range"):
        CompressionSpace.load("sparsity").materialize(architecture(llama), 0.99)


@pytest.mark.parametrize("shape", [dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                        num_key_value_heads=3),  # SmolLM2-135M
                                   dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                        num_key_value_heads=8)])  # Llama-3-8B, Mistral, Qwen2 shapes: 8 KV heads
@pytest.mark.parametrize("target", [0.5, 0.7])
def test_evopress_spacing_lets_every_layer_move_both_ways(shape, target):
    """Steps of the mean layer freeze GQA's small k/v projections (one level at 8B); EvoPress's steps of
    hidden^2 give every layer at least 5 levels, some denser and some sparser than the target."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evosearch.kinds.sparsity import AroundTarget

    with torch.device("meta"):
        arch = architecture(LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, vocab_size=1000, **shape)))
    base = CompressionSpace.load("sparsity")

    def units(levels):
        spec = base.model_copy(update={"compression": base.compression.model_copy(update={"levels": levels})})
        return spec.materialize(arch, target).space.units

    for unit in units(AroundTarget(steps=8, spacing="evopress")):
        sparsities = unit.resources["sparsity"]
        assert len(sparsities) >= 5 and min(sparsities) < target < max(sparsities), unit.name
    frozen = [u for u in units(AroundTarget(steps=4, step=0.1)) if max(u.resources["sparsity"]) < target + 1e-6]
    assert frozen  # the mean-layer spacing leaves some layer unable to go sparser than the target
