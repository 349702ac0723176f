"""Dropping attention or MLP sub-blocks, or whole decoder blocks (ShortGPT-style depth pruning).

Levels ``Dense`` (labelled ``keep``) and ``Drop``. During the search a dropped unit has its
output projections zeroed, so the residual stream passes through it unchanged, exactly as
if it were removed; export removes it for real (fewer layers, or evosearch's Llama with
per-block overrides). Nothing is stored in the database, so no Hessians are collected.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import field_validator

from evosearch.kinds.base import Compression, Dense, Drop, Keep, linear_parameters
from evosearch.problem import SearchProblem, make_budget
from evosearch.space import Space, Unit


class DropSpace(Compression):
    kind: Literal["drop"] = "drop"
    units: list[Literal["attention", "mlp", "block"]] = ["attention", "mlp"]
    levels_types: ClassVar = (Dense, Drop)

    @field_validator("units")
    @classmethod
    def _check_units(cls, units):
        if "block" in units and len(units) > 1:
            raise ValueError("drop either whole blocks or attention/MLP blocks, not both")
        return units

    def problem(self, space, arch, target):
        model_units = arch.units(tuple(self.units))
        units = [Unit(name=u.name, levels=["keep", "drop"], size=u.params, group="drop",
                      resources={"dropped": [0, 1], "params": [u.params, 0]}) for u in model_units]
        searched = Space(units=units, name=space.name, description=space.description)
        budget = make_budget(space.budget, searched, 0.0 if target is None else target)
        return SearchProblem(space, arch, searched, budget, {u.name: u for u in model_units},
                             {u.name: [Dense(), Drop()] for u in model_units})

    def database_identity(self) -> dict:
        return {"compression": self.kind, "method": None}

    def needs_hessians(self) -> bool:
        return False

    def parameters(self, arch, unit):
        return linear_parameters(arch, arch.output_linears(unit))

    def tensors(self, arch, unit, level, dense, database, *, device, searching=True):
        values = {name: dense[name] for name in self.parameters(arch, unit)}
        return {name: torch.zeros_like(v) for name, v in values.items()} if isinstance(level, Drop) else values

    def measure(self, arch, problem, levels):
        return {"dropped": float(sum(arch.is_dropped(mu) for mu in problem.model_units.values()))}

    def kept_parameters(self, arch, problem: SearchProblem) -> int:
        return sum(int(torch.count_nonzero(p)) for mu in problem.model_units.values() if not arch.is_dropped(mu)
                   for name in mu.linears for p in arch.module(name).parameters())

    def export(self, job):
        job.removed |= {unit for unit, level in job.levels.items() if isinstance(level, Drop)}

    def keep(self, arch, unit, level):
        return dropped_keep(arch, unit) if isinstance(level, Drop) else Keep(zeros=set(unit.linears))


def dropped_keep(arch, unit) -> Keep:
    """A dropped unit stays dropped: its layers are not trained."""
    return Keep(frozen=set(unit.linears), dropped={unit.name})
