"""Unstructured sparsity per linear layer: SparseGPT (default), Wanda or magnitude pruning.

Levels follow EvoPress (``AroundTarget``): they step by an equal *number of weights* around
the target, in every layer, so raising one layer a level and lowering another keeps the
total number of zeros exactly where it is; a level is named by its step from the target
(0 is the uniform level). A list of levels (``[0.0, 0.5, "2:4"]``) gives every layer the
same sparsities instead, N:M patterns included (built and exported as ``kinds.nm`` does).

A level is ``Sparse(zeros)``: that many weights of the layer are zero. Export stores such a
layer dense (its zeros in place); its latency is the dense layer's.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from evosearch.database.sparsity import SparseGPT, magnitude_prune, wanda_prune
from evosearch.database.structured import reform
from evosearch.errors import EvosearchError
from evosearch.kinds import nm
from evosearch.kinds.base import Compression, Dense, Level, Reformation
from evosearch.kinds.nm import NM
from evosearch.problem import SearchProblem, make_budget
from evosearch.space import Space, Unit


class Sparse(Level):
    """``zeros`` weights of the layer pruned (unstructured)."""

    type: ClassVar[str] = "sparse"
    name_pattern: ClassVar[re.Pattern] = re.compile(r"^zeros=(\d+)$")
    zeros: int

    @property
    def name(self) -> str:
        return f"zeros={self.zeros}"

    @classmethod
    def from_name(cls, name: str) -> Level | None:
        match = cls.name_pattern.match(str(name))
        return cls(zeros=int(match[1])) if match else None


class AroundTarget(BaseModel):
    """Levels on each side of the target sparsity, every step the same number of weights in every layer,
    so level switches keep the total exactly. Levels are named by their step from the target: level 0
    is the uniform one, -2 two steps denser.

    ``spacing`` says how many weights a step is:

    - ``mean_layer``: ``step`` x the mean size of the searched layers, ``steps`` on each side where the
      layer has room. Small layers (k/v projections under GQA) then get few levels, or one;
    - ``evopress``: the reference code's ``0.5 x min(t, 1 - t) / steps x hidden_size^2`` (t the target),
      up to ``steps`` on each side: a small layer moves in large fractions of itself, a large one in
      small ones, and every layer has room both ways.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(8, ge=1, le=64)
    step: float = Field(0.05, gt=0, le=1, description="mean_layer: a step, as a fraction of the mean layer")
    spacing: Literal["mean_layer", "evopress"] = "mean_layer"

    def step_weights(self, sizes: list[int], hidden: int, target: float) -> int:
        if self.spacing == "evopress":
            return max(1, int(0.5 * min(target, 1 - target) / self.steps * hidden**2))
        return max(1, round(self.step * sum(sizes) / len(sizes)))


class SparsitySpace(Compression):
    kind: Literal["sparsity"] = "sparsity"
    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    units: Literal["linear"] = "linear"
    levels: Union[AroundTarget, list[Union[float, str]]] = AroundTarget()
    max_sparsity: float = Field(0.95, gt=0, lt=1)
    reform: Reformation | None = Field(None, description="rectify every pruned layer's kept weights after pruning")
    levels_types: ClassVar = (Dense, Sparse, NM)

    @field_validator("reform")
    @classmethod
    def _check_reform(cls, reform):
        if reform is not None and reform.method != "admm":
            raise ValueError("unstructured masks keep a different support in every row; use method: admm")
        return reform

    @field_validator("levels")
    @classmethod
    def _check_levels(cls, levels):
        if isinstance(levels, list):
            if not levels:
                raise ValueError("levels must not be empty")
            for level in levels:
                if isinstance(level, str):
                    nm.check_pattern(level)
                elif not 0 <= level < 1:
                    raise ValueError(f"sparsity level {level} is outside [0, 1)")
        return levels

    def database_identity(self) -> dict:
        identity = super().database_identity()
        if self.reform is not None:  # reformed entries differ from plain ones; other databases keep their key
            identity["reform"] = self.reform.model_dump()
        return identity

    def check_budget(self, value):
        if isinstance(self.levels, AroundTarget) and not 0 <= value <= self.max_sparsity:
            raise EvosearchError(f"--budget {value:g} is outside this space's range [0, {self.max_sparsity}] "
                                 f"of average sparsity")

    # --- the problem
    def problem(self, space, arch, target):
        linears = arch.units("linear")
        units, levels = [], {}
        if isinstance(self.levels, AroundTarget):
            if target is None:
                raise EvosearchError(f"space {space.name or 'sparsity'} spaces its levels around a target sparsity, "
                                     f"so its budget must be that sparsity; give a list of levels for a latency or "
                                     f"bytes budget")
            self.check_budget(target)
            sizes = [u.shape[0] * u.shape[1] for u in linears]
            step_weights = self.levels.step_weights(sizes, arch.config.hidden_size, target)
            for u, size in zip(linears, sizes):
                centre = round(target * size)
                offsets = [k for k in range(-self.levels.steps, self.levels.steps + 1)
                           if 0 <= centre + k * step_weights <= self.max_sparsity * size]
                zeros = [centre + k * step_weights for k in offsets]
                # A level is its step from the target (0 = the uniform level), as in EvoPress.
                units.append(Unit(name=u.name, levels=offsets, size=size, group="linear",
                                  resources={"sparsity": [z / size for z in zeros],
                                             "params": [size - z for z in zeros]}))
                levels[u.name] = [Dense() if z == 0 else Sparse(zeros=z) for z in zeros]
        else:
            for u in linears:
                size = u.shape[0] * u.shape[1]
                ratios = [self._ratio(label) for label in self.levels]
                typed = [self._list_level(label, ratio, size) for label, ratio in zip(self.levels, ratios)]
                units.append(Unit(name=u.name, levels=list(self.levels), size=size,
                                  group=f"{u.shape[0]}x{u.shape[1]}",
                                  resources={"sparsity": ratios, "params": [size * (1 - r) for r in ratios]}))
                levels[u.name] = typed
        searched = Space(units=units, name=space.name, description=space.description)
        # Whole weights: a layer's zeros are rounded, so an average is exact to one weight per layer.
        rounding = len(units) / sum(u.size for u in units)
        budget = make_budget(space.budget, searched, 0.0 if target is None else target, rounding)
        return SearchProblem(space, arch, searched, budget, {u.name: u for u in linears}, levels)

    @staticmethod
    def _ratio(label: float | str) -> float:
        return NM.from_name(label).sparsity if isinstance(label, str) else float(label)

    @staticmethod
    def _list_level(label: float | str, ratio: float, size: int) -> Level:
        if ratio == 0:
            return Dense()
        return NM.from_name(label) if isinstance(label, str) else Sparse(zeros=round(ratio * size))

    # --- the database
    def build(self, arch, unit, hessians, missing, levels, database):
        """Every missing level of one linear layer; SparseGPT sweeps all unstructured levels at once."""
        hessian = hessians[unit.name]
        weight = arch.module(unit.name).weight
        by_key = {level.key: level for level in levels}
        wanted = [by_key[key] for key in missing]
        unstructured = [level for level in wanted if isinstance(level, Sparse)]
        patterns = [level for level in wanted if isinstance(level, NM)]
        pruned = {}
        solver = SparseGPT(weight, hessian.H) if self.method == "sparsegpt" else None
        if self.method == "sparsegpt":
            sparsities = [level.zeros / weight.numel() for level in unstructured]
            pruned = dict(zip(unstructured, solver.prune_levels(sparsities)))
        else:
            for level in unstructured:
                sparsity = level.zeros / weight.numel()
                pruned[level] = (wanda_prune(weight, hessian.column_norms(), sparsity) if self.method == "wanda"
                                 else magnitude_prune(weight, sparsity))
        pruned |= {level: nm.prune(self.method, weight, hessian.H, hessian.column_norms, level, solver)
                   for level in patterns}
        for level, value in pruned.items():
            if self.reform is not None:
                r = self.reform
                value, _ = reform(weight, hessian.H, value != 0, rho=r.rho, iterations=r.iterations, damp=r.damp,
                                  start=value)
            database.put(unit.name, level.key, {f"{unit.name}.weight": value.to(weight.dtype)})

    # --- resources, export
    def latency_class(self, level):
        if isinstance(level, NM):
            return nm.latency_class(level)
        return Dense() if isinstance(level, Sparse) else level

    def measure(self, arch, problem, levels):
        return {"sparsity": nm.zero_fraction(arch, problem.model_units)}

    def export(self, job):
        """Sparse weights are already in place; 2:4 layers are flagged for semi-structured tensors."""
        for unit, level in job.levels.items():
            if isinstance(level, NM) and level.semi_structured:
                job.semi_structured.add(unit)
