"""N:M sparsity: n zeros in every m consecutive input weights of a row (2:4 is what sparse tensor cores run).

Levels: ``Dense`` and ``NM(n, m)`` per linear layer, pruned by SparseGPT (default), Wanda or
magnitude with the pattern fixed. On disk a 2:4 layer stays dense; ``evosearch.runtime``
turns it into a PyTorch semi-structured sparse tensor on a GPU that runs one, so export
flags it (``job.semi_structured``), hardware tables time it as ``2:4``, and other patterns
run at dense speed. The ``sparsity`` kind takes N:M levels too (``levels: [0.0, "2:4"]``)
and builds them with this module's functions.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

from evosearch.database.sparsity import SparseGPT, magnitude_prune, wanda_prune
from evosearch.kinds.base import Compression, Dense, Level
from evosearch.problem import SearchProblem, make_budget
from evosearch.space import Space, Unit

NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


class NM(Level):
    """``n`` zeros in every ``m`` consecutive input weights of each row."""

    type: ClassVar[str] = "nm"
    name_pattern: ClassVar[re.Pattern] = NM_PATTERN
    n: int
    m: int

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    @property
    def semi_structured(self) -> bool:
        """The pattern PyTorch's semi-structured sparse kernels run."""
        return (self.n, self.m) == (2, 4)

    @classmethod
    def from_name(cls, name: str) -> Level | None:
        match = NM_PATTERN.match(str(name))
        if not match or not 0 < int(match[1]) < int(match[2]):
            return None
        return cls(n=int(match[1]), m=int(match[2]))

    def applies_to(self, unit) -> bool:
        return unit.kind == "linear"

    def runtime_module(self, arch, unit, device):
        """2:4 through PyTorch's semi-structured kernels; other patterns are stored and run dense."""
        return semi_structured_module(arch.module(unit.name), device) if self.semi_structured else None


def check_pattern(level: str) -> str:
    """A level label that must be an N:M pattern (for the spaces' validators)."""
    if NM.from_name(level) is None:
        raise ValueError(f"level {level!r} is not an N:M pattern like '2:4' (N zeros in every M)")
    return level


def prune(method: str, weight: torch.Tensor, H: torch.Tensor, column_norms, level: NM,
          solver: SparseGPT | None = None) -> torch.Tensor:
    """The layer pruned to ``level`` by ``method`` (``solver``: a SparseGPT already set up for it)."""
    pattern = (level.n, level.m)
    if method == "sparsegpt":
        return (solver or SparseGPT(weight, H)).prune(level.sparsity, pattern)
    if method == "wanda":
        return wanda_prune(weight, column_norms(), level.sparsity, pattern)
    return magnitude_prune(weight, level.sparsity, pattern)


def semi_structured_module(layer: torch.nn.Linear, device: torch.device):
    """A copy of ``layer`` pruned to 2:4 by magnitude as a semi-structured sparse layer (for timing),
    or None where no semi-structured kernel runs it (then an export runs it dense)."""
    from evosearch.runtime import to_semi_structured

    weight = layer.weight.detach().clone()
    keep = weight.abs().reshape(-1, 4).topk(2, dim=1).indices
    mask = torch.zeros_like(weight.reshape(-1, 4), dtype=torch.bool).scatter_(1, keep, True)
    sparse = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=device,
                             dtype=weight.dtype)
    sparse.weight = torch.nn.Parameter(weight * mask.reshape(weight.shape), requires_grad=False)
    if layer.bias is not None:
        sparse.bias = layer.bias
    return sparse if to_semi_structured(sparse, [""]) else None


def latency_class(level: NM) -> Level:
    """2:4 runs as itself where a GPU has the kernels; other patterns are stored and run dense."""
    return level if level.semi_structured else Dense()


class NMSpace(Compression):
    """Each linear layer dense or at one of ``patterns``, pruned by ``method`` with the pattern fixed.

    Layers are grouped by shape: an EvoPress switch then moves one layer to a pattern and an
    equal one back, and the average sparsity stays where it is.
    """

    kind: Literal["nm"] = "nm"
    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    units: Literal["linear"] = "linear"
    patterns: list[str] = Field(default_factory=lambda: ["2:4"])
    levels_types: ClassVar = (Dense, NM)

    @field_validator("patterns")
    @classmethod
    def _check_patterns(cls, patterns):
        if not patterns or len(set(patterns)) != len(patterns):
            raise ValueError("give distinct N:M patterns, like ['2:4']")
        return [check_pattern(p) for p in patterns]

    def problem(self, space, arch, target):
        linears = arch.units("linear")
        labels = [0.0, *self.patterns]
        typed = [Dense(), *(NM.from_name(p) for p in self.patterns)]
        ratios = [0.0, *(level.sparsity for level in typed[1:])]
        units = [Unit(name=u.name, levels=labels, size=u.shape[0] * u.shape[1], group=f"{u.shape[0]}x{u.shape[1]}",
                      resources={"sparsity": ratios, "params": [u.shape[0] * u.shape[1] * (1 - r) for r in ratios]})
                 for u in linears]
        searched = Space(units=units, name=space.name, description=space.description)
        budget = make_budget(space.budget, searched, 0.0 if target is None else target)
        return SearchProblem(space, arch, searched, budget, {u.name: u for u in linears},
                             {u.name: list(typed) for u in linears})

    def build(self, arch, unit, hessians, missing, levels, database):
        hessian = hessians[unit.name]
        weight = arch.module(unit.name).weight
        solver = SparseGPT(weight, hessian.H) if self.method == "sparsegpt" else None
        by_key = {level.key: level for level in levels}
        for key in missing:
            pruned = prune(self.method, weight, hessian.H, hessian.column_norms, by_key[key], solver)
            database.put(unit.name, key, {f"{unit.name}.weight": pruned.to(weight.dtype)})

    def latency_class(self, level):
        return latency_class(level) if isinstance(level, NM) else level

    def measure(self, arch, problem, levels):
        return {"sparsity": zero_fraction(arch, problem.model_units)}

    def export(self, job):
        for unit, level in job.levels.items():
            if isinstance(level, NM) and level.semi_structured:
                job.semi_structured.add(unit)


def zero_fraction(arch, units) -> float:
    """The fraction of the units' weights that are zero, counted from the model."""
    zeros = sum(int((arch.module(u).weight == 0).sum()) for u in units)
    return zeros / sum(arch.module(u).weight.numel() for u in units)
