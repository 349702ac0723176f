"""A compression kind written outside evosearch: magnitude pruning of linear layers to fixed fractions.

This one module is all a new kind takes: its spec and level, how it builds its levels, and
what its export and healing need (here nothing beyond the defaults: a pruned layer is stored
dense, its zeros stay zero). ``tests/test_kinds.py`` registers it and searches with it.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from evosearch.database.sparsity import magnitude_prune
from evosearch.kinds import register
from evosearch.kinds.base import Compression, Dense, Level
from evosearch.problem import SearchProblem, make_budget
from evosearch.space import Space, Unit


class Pruned(Level):
    """The ``percent`` smallest weights of the layer set to zero."""

    type: ClassVar[str] = "toy-pruned"
    name_pattern: ClassVar[re.Pattern] = re.compile(r"^pruned=(\d+)%$")
    percent: int

    @property
    def name(self) -> str:
        return f"pruned={self.percent}%"

    @classmethod
    def from_name(cls, name: str):
        match = cls.name_pattern.match(name)
        return cls(percent=int(match[1])) if match else None


@register
class MagnitudeSpace(Compression):
    kind: Literal["toy-magnitude"] = "toy-magnitude"
    percents: list[int] = [0, 25, 50, 75]
    levels_types: ClassVar = (Dense, Pruned)

    def problem(self, space, arch, target):
        linears = arch.units("linear")
        levels = [Dense() if p == 0 else Pruned(percent=p) for p in self.percents]
        fractions = [p / 100 for p in self.percents]
        units = [Unit(name=u.name, levels=list(self.percents), size=u.shape[0] * u.shape[1],
                      group=f"{u.shape[0]}x{u.shape[1]}", resources={"sparsity": fractions}) for u in linears]
        searched = Space(units=units, name=space.name)
        budget = make_budget(space.budget, searched, 0.0 if target is None else target)
        return SearchProblem(space, arch, searched, budget, {u.name: u for u in linears},
                             {u.name: list(levels) for u in linears})

    def needs_hessians(self) -> bool:
        return False  # magnitude pruning reads the weights alone

    def build(self, arch, unit, hessians, missing, levels, database):
        weight = arch.module(unit.name).weight
        for level in levels:
            if level.key in missing:
                database.put(unit.name, level.key, {f"{unit.name}.weight": magnitude_prune(weight, level.percent / 100)})

    def measure(self, arch, problem, levels):
        weights = [arch.module(u).weight for u in problem.model_units]
        return {"sparsity": sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)}
