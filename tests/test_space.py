import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from evosearch import Budget, EvosearchError, Space, Unit
from evosearch.space import Feasibility

SCHEMA = Path(__file__).parent.parent / "docs" / "space.schema.json"


def small_space() -> Space:
    return Space(
        name="toy",
        units=[
            Unit(name="attn", levels=[0.0, 0.5], resources={"sparsity": [0.0, 0.5], "bits": [16, 16]}, size=1),
            Unit(name="mlp", levels=[0.0, 0.5, 0.7], resources={"sparsity": [0.0, 0.5, 0.7]}, size=3),
            Unit(name="head", levels=["keep", "drop"], resources={"bits": [16, 0]}, size=2),
        ],
    )


@pytest.mark.parametrize(
    "units, message",
    [
        ([], "units is empty"),
        ([{"name": "a", "levels": 0.5}], "levels must be a list"),
        ([{"name": "a", "levels": []}], "levels is empty"),
        ([{"name": "a", "levels": [1, 2], "resources": {"x": [1]}}], "resources.x has 1 values but there are 2 levels"),
        ([{"name": "a", "levels": [1, 1]}], "repeat a value"),
        ([{"name": "a", "levels": [1]}, {"name": "a", "levels": [2]}], "unit name 'a' is used twice"),
        ([{"name": "a", "levels": [1], "size": 0}], "size must be a positive number"),
    ],
)
def test_bad_space_names_the_field(units, message):
    with pytest.raises(EvosearchError, match=message):
        Space.model_validate({"units": units})


def test_unknown_field_is_rejected():
    with pytest.raises(ValidationError, match="colour"):
        Space.model_validate({"units": [{"name": "a", "levels": [1], "colour": "red"}]})
    with pytest.raises(EvosearchError, match=r"units\.0\.colour"):
        Space.from_yaml("units: [{name: a, levels: [1], colour: red}]")


def test_index_and_value_round_trip():
    space = small_space()
    assignment = {"attn": 0.5, "mlp": 0.7, "head": "drop"}
    assert space.indices(assignment).tolist() == [1, 2, 1]
    assert space.assignment([1, 2, 1]) == assignment
    assert space.unit("mlp").size == 3
    with pytest.raises(EvosearchError, match="unit 'mlp' has no level 0.6"):
        space.indices({**assignment, "mlp": 0.6})
    with pytest.raises(EvosearchError, match="missing units"):
        space.indices({"attn": 0.5})
    rng = np.random.default_rng(0)
    for _ in range(20):
        random = space.random_assignment(rng)
        assert all(random[u.name] in u.levels for u in space.units)


def test_budget_usage_total_and_size_weighted_average():
    space = small_space()
    a = {"attn": 0.5, "mlp": 0.7, "head": "drop"}
    # 'head' has no sparsity: it counts as 0 in a total and is left out of an average.
    assert Budget(resource="sparsity", max_total=10).usage(space, a) == pytest.approx(1.2)
    assert Budget(resource="sparsity", average=0.5).usage(space, a) == pytest.approx((1 * 0.5 + 3 * 0.7) / 4)
    assert space.usage(a, "bits") == 16
    assert Budget(resource="sparsity", max_average=0.65).range(space) == pytest.approx((0.0, (0.5 + 2.1) / 4))
    assert Budget(resource="bits", total=16).is_met(space, a)
    assert not Budget(resource="bits", total=17).is_met(space, a)
    assert Budget(resource="bits", total=17, tolerance=1).is_met(space, a)


def test_budget_forms_and_reach_are_checked():
    space = small_space()
    with pytest.raises(EvosearchError, match="exactly one of"):
        Budget(resource="bits", max_total=3, average=2)
    with pytest.raises(EvosearchError, match="exactly one of"):
        Budget(resource="bits")
    with pytest.raises(EvosearchError, match=r"no resource 'latency' \(resources: \['bits', 'sparsity'\]\)"):
        Budget(resource="latency", max_total=1).check(space)
    with pytest.raises(EvosearchError, match=r"average sparsity=0.97 is out of reach: this space reaches at most 0.65"):
        Budget(resource="sparsity", average=0.97).check(space)
    with pytest.raises(EvosearchError, match=r"max_total bits=-1 is out of reach: this space needs at least 16 "):
        Budget(resource="bits", max_total=-1).check(space)
    Budget(resource="sparsity", average=0.65).check(space)  # exactly the maximum is reachable


def test_repair_reaches_feasibility():
    space = Space(
        units=[Unit(name=f"u{i}", levels=list(range(6)), resources={"cost": [5 - j + i % 3 for j in range(6)]}, size=1 + i % 4) for i in range(30)]
    )
    budgets = [Budget(resource="cost", max_average=3.0), Budget(resource="cost", max_total=95)]
    feasibility = Feasibility(space, budgets)
    anchor = np.full(30, 5)
    assert feasibility.is_met(anchor)
    rng = np.random.default_rng(0)
    for _ in range(50):
        proposal = rng.integers(0, 6, 30)
        repaired = feasibility.repair(proposal, rng, anchor)
        assert all(b.is_met(space, space.assignment(repaired)) for b in budgets)
        if feasibility.is_met(proposal):
            assert np.array_equal(repaired, proposal)


def test_yaml_round_trip(tmp_path):
    space = small_space()
    assert Space.from_yaml(space.to_yaml()) == space
    path = tmp_path / "space.yaml"
    path.write_text(space.to_yaml())
    assert Space.from_yaml(path) == space
    assert Space.from_yaml(str(path)) == space
    with pytest.raises(EvosearchError, match="cannot read the space file"):
        Space.from_yaml(tmp_path / "missing.yaml")


def test_json_schema_is_current():
    current = json.dumps(Space.model_json_schema(), indent=2) + "\n"
    assert SCHEMA.read_text() == current, (
        "docs/space.schema.json is stale; regenerate it with: python -c 'import json, evosearch; "
        "print(json.dumps(evosearch.Space.model_json_schema(), indent=2))' > docs/space.schema.json"
    )
