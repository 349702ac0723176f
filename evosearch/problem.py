"""A search problem: a compression space made concrete for one model and one budget.

``CompressionSpace.materialize`` (``evosearch.compression``) asks the space's kind for it. It
holds the generic ``Space`` the samplers search (units, level labels, resources), the
``Budget``, and for every unit the model part it stands for and the typed ``Level`` behind
each of its level labels; the kind (``problem.compression``) is what builds, applies,
counts and exports those levels.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from evosearch.errors import EvosearchError
from evosearch.levels import Level
from evosearch.space import Budget, Space, Unit
from evosearch.units import Architecture, ModelUnit


class BudgetSpec(BaseModel):
    """How ``--budget VALUE`` is read: the resource, and whether VALUE is an average or a fraction of units."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resource: str
    form: Literal["average", "fraction_of_units", "max_average", "max_total"] = "average"
    tolerance: float = Field(0.0, ge=0, description="how far an equality budget may be missed")


class SpaceSpec(Protocol):
    """What a problem keeps of the space it was made from (an ``evosearch.compression.CompressionSpace``)."""

    name: str
    description: str
    compression: Any  # an evosearch.kinds.base.Compression (whose module builds on this one)
    budget: BudgetSpec


class SearchProblem:
    """A compression space made concrete for one model and one budget."""

    def __init__(self, spec: SpaceSpec, arch: Architecture, space: Space, budget: Budget,
                 model_units: dict[str, ModelUnit], levels: dict[str, list[Level]], starts: list[dict] | None = None):
        self.spec = spec
        self.arch = arch
        self.space = space
        self.budget = budget
        self.model_units = model_units  # unit name -> the model part it stands for
        self.levels = levels  # unit name -> its typed level behind each level label of the space, in order
        self.starts = starts or []  # assignments a search may start from besides the uniform one

    @property
    def compression(self):
        """The kind: what builds, applies, counts and exports the levels."""
        return self.spec.compression

    def level(self, unit: str, label) -> Level:
        """The typed level behind a unit's level label (an assignment's value)."""
        return self.levels[unit][self.space.unit(unit).levels.index(label)]

    def typed(self, assignment: dict) -> dict[str, Level]:
        """An assignment's typed levels, unit by unit."""
        return {unit: self.level(unit, label) for unit, label in assignment.items()}

    def with_resources(self, resources: dict[str, dict[str, list[float]]]) -> SearchProblem:
        """The same problem with more resources per unit (``{resource: {unit: one value per level}}``),
        e.g. the latencies of a hardware table; a resource the units already have is replaced."""
        units = [Unit(**unit.model_dump() | {"resources": unit.resources | {
            name: values[unit.name] for name, values in resources.items() if unit.name in values}})
            for unit in self.space.units]
        space = Space(units=units, name=self.space.name, description=self.space.description)
        return SearchProblem(self.spec, self.arch, space, self.budget, self.model_units, self.levels, self.starts)

    def with_budget(self, budget: Budget) -> SearchProblem:
        starts = [start for start in self.starts if budget.is_met(self.space, start)]
        return SearchProblem(self.spec, self.arch, self.space, budget, self.model_units, self.levels, starts)


def make_budget(spec: BudgetSpec, space: Space, value: float, rounding: float = 0.0) -> Budget:
    """The budget ``--budget value`` means for ``space`` (``rounding``: how far whole weights or steps
    keep an average from the value)."""
    if spec.form == "fraction_of_units":
        # All units removed leaves no model to measure (its perplexity is meaningless).
        units, total = len(space.units), round(value * len(space.units))
        if not 0 <= value < 1:
            raise EvosearchError(f"--budget {value:g} must be a fraction of the units in [0, 1) (1 removes every one)")
        if units and total >= units:
            raise EvosearchError(f"--budget {value:g} rounds to all {units} units; at most {(units - 1) / units:.4g} "
                                 f"keeps one")
        return Budget(resource=spec.resource, total=total)
    if spec.form == "average":
        return Budget(resource=spec.resource, average=value, tolerance=max(rounding, spec.tolerance))
    if spec.form == "max_average":
        return Budget(resource=spec.resource, max_average=value)
    return Budget(resource=spec.resource, max_total=value)


def check_reach(budget: Budget, space: Space, target: float) -> None:
    """Refuse a budget value that no assignment of ``space`` can meet, naming the range it can."""
    (low, high), (lower, upper) = budget.range(space), budget.bounds()
    if low > upper or high < lower:
        raise EvosearchError(f"--budget {target:g} is out of reach: the {budget.form.split('_')[-1]} "
                             f"{budget.resource} of this space ranges over [{low:.4g}, {high:.4g}]")


def spread(total: int, count: int) -> list[int]:
    """``total`` split into ``count`` whole numbers that differ by at most one, the larger ones spread evenly."""
    base, extra = divmod(total, count)
    return [base + ((i + 1) * extra // count - i * extra // count) for i in range(count)]
