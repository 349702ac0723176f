"""What may change (the space) and what it may cost (the budgets).

A `Space` lists `Unit`s; each unit has ordered `levels` (by convention from least to
most compressed) and, per named resource, one cost per level. An *assignment* picks
one level per unit and is a plain ``{unit_name: level_value}`` dict. A `Budget` bounds
one resource over the whole assignment, either as a total or as an average weighted
by unit `size`. Internally the samplers work on level *indices* (a numpy int vector in
unit order); `Space.indices` and `Space.assignment` convert.

`Feasibility` checks budgets fast on index vectors and `Feasibility.repair` moves an
assignment one level at a time until every budget holds; samplers that propose
assignments blind to the budget (Optuna's) go through it.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from evosearch.errors import EvosearchError, first_problem

Level = int | float | str
Assignment = dict[str, Level]

# Budgets compare floats that are sums of many terms; this slack (relative to the
# budget's value) keeps an exactly-met budget from failing on rounding.
_RTOL = 1e-9


class Unit(BaseModel):
    """One part of the model whose compression level is chosen independently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    levels: list[int | float | str]
    resources: dict[str, list[float]] = {}
    size: float = 1.0
    group: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _levels_is_a_list(cls, data: Any) -> Any:
        if isinstance(data, dict):
            levels = data.get("levels")
            if "levels" in data and not isinstance(levels, (list, tuple)):
                raise EvosearchError(
                    f"unit {data.get('name')!r}: levels must be a list such as [0.0, 0.5, 0.7], "
                    f"got {levels!r}"
                )
        return data

    @model_validator(mode="after")
    def _check(self) -> Unit:
        if not self.levels:
            raise EvosearchError(f"unit {self.name!r}: levels is empty; give at least one level")
        if len(set(map(repr, self.levels))) != len(self.levels):
            raise EvosearchError(f"unit {self.name!r}: levels {self.levels} repeat a value")
        for resource, values in self.resources.items():
            if len(values) != len(self.levels):
                raise EvosearchError(
                    f"unit {self.name!r}: resources.{resource} has {len(values)} values but "
                    f"there are {len(self.levels)} levels; give one value per level"
                )
            if not all(math.isfinite(v) for v in values):
                raise EvosearchError(f"unit {self.name!r}: resources.{resource} must be finite")
        if not (self.size > 0 and math.isfinite(self.size)):
            raise EvosearchError(f"unit {self.name!r}: size must be a positive number")
        return self


class Space(BaseModel):
    """The units of a search and their levels; validated, and round-trips through YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    units: list[Unit]
    name: str = ""
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> Space:
        if not self.units:
            raise EvosearchError("space: units is empty; list at least one unit")
        seen = set()
        for unit in self.units:
            if unit.name in seen:
                raise EvosearchError(f"space: unit name {unit.name!r} is used twice; names must be unique")
            seen.add(unit.name)
        return self

    # --- lookup -------------------------------------------------------------------

    @cached_property
    def _position(self) -> dict[str, int]:
        return {unit.name: i for i, unit in enumerate(self.units)}

    @cached_property
    def n_levels(self) -> np.ndarray:
        return np.array([len(unit.levels) for unit in self.units])

    @cached_property
    def sizes(self) -> np.ndarray:
        return np.array([unit.size for unit in self.units], dtype=float)

    @cached_property
    def resources(self) -> list[str]:
        return sorted({r for unit in self.units for r in unit.resources})

    def unit(self, name: str) -> Unit:
        if name not in self._position:
            raise EvosearchError(f"space has no unit {name!r}")
        return self.units[self._position[name]]

    def indices(self, assignment: Assignment) -> np.ndarray:
        """Level index of each unit, in unit order."""
        missing = [u.name for u in self.units if u.name not in assignment]
        extra = [name for name in assignment if name not in self._position]
        if missing or extra:
            raise EvosearchError(
                f"assignment does not match the space: missing units {missing}, unknown units {extra}"
            )
        out = np.empty(len(self.units), dtype=np.int64)
        for i, unit in enumerate(self.units):
            level = assignment[unit.name]
            try:
                out[i] = next(j for j, v in enumerate(unit.levels) if v == level)
            except StopIteration:
                raise EvosearchError(
                    f"assignment: unit {unit.name!r} has no level {level!r} (levels: {unit.levels})"
                ) from None
        return out

    def assignment(self, indices) -> Assignment:
        return {unit.name: unit.levels[int(i)] for unit, i in zip(self.units, indices)}

    def random_assignment(self, rng: np.random.Generator) -> Assignment:
        """Each unit at a uniformly random level (budgets are not considered)."""
        return self.assignment(rng.integers(0, self.n_levels))

    def usage(self, assignment: Assignment, budget_or_resource: Budget | str) -> float:
        """A budget's usage, or the plain total of a resource."""
        if isinstance(budget_or_resource, str):
            budget_or_resource = Budget(resource=budget_or_resource, max_total=math.inf)
        return budget_or_resource.usage(self, assignment)

    def resource_table(self, resource: str) -> np.ndarray:
        """Cost of `resource` per unit and level (n_units x max_levels, NaN where absent)."""
        return self._tables[resource]

    @cached_property
    def _tables(self) -> dict[str, np.ndarray]:
        tables = {}
        for resource in self.resources:
            table = np.full((len(self.units), int(self.n_levels.max())), np.nan)
            for i, unit in enumerate(self.units):
                if resource in unit.resources:
                    table[i, : len(unit.levels)] = unit.resources[resource]
            tables[resource] = table
        return tables

    def hash(self) -> str:
        """Digest of the units (not the name or description), to recognise a space on resume."""
        units = [u.model_dump() for u in self.units]
        return hashlib.sha256(json.dumps(units, sort_keys=True).encode()).hexdigest()[:16]

    # --- YAML ---------------------------------------------------------------------

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_defaults=True)
        data["units"] = [u.model_dump(exclude_defaults=True) for u in self.units]
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> Space:
        """Load a space from a YAML file path or from YAML text."""
        source = "space"
        text = str(path_or_text)
        if isinstance(path_or_text, Path) or ("\n" not in text and text.endswith((".yaml", ".yml"))):
            source = str(path_or_text)
            try:
                text = Path(path_or_text).read_text()
            except OSError as e:
                raise EvosearchError(f"{source}: cannot read the space file ({e.strerror})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise EvosearchError(f"{source}: not valid YAML ({e})".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise EvosearchError(f"{source}: expected a mapping with a 'units' list")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise EvosearchError(f"{source}: {first_problem(e)}") from None


class Budget(BaseModel):
    """One constraint on one resource: exactly one of max_total, total, max_average, average.

    A total is the sum over units of the resource at each unit's level; an average is
    that sum weighted by unit size and divided by the total size. Units that do not
    list the resource count as zero in a total and are left out of an average.
    `total` and `average` are equalities, met within `tolerance`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    resource: str
    max_total: float | None = None
    total: float | None = None
    max_average: float | None = None
    average: float | None = None
    tolerance: float = 0.0

    @model_validator(mode="after")
    def _one_form(self) -> Budget:
        given = [f for f in ("max_total", "total", "max_average", "average") if getattr(self, f) is not None]
        if len(given) != 1:
            raise EvosearchError(
                f"budget on {self.resource!r}: give exactly one of max_total, total, max_average, "
                f"average (got {given or 'none'})"
            )
        if not self.tolerance >= 0:
            raise EvosearchError(f"budget on {self.resource!r}: tolerance must be >= 0")
        return self

    @property
    def form(self) -> str:
        return next(f for f in ("max_total", "total", "max_average", "average") if getattr(self, f) is not None)

    @property
    def target(self) -> float:
        return getattr(self, self.form)

    @property
    def is_average(self) -> bool:
        return self.form.endswith("average")

    @property
    def label(self) -> str:
        """Names the budget in trial attributes and messages, e.g. 'average sparsity'."""
        return f"{self.form} {self.resource}"

    def __str__(self) -> str:
        return f"budget {self.form} {self.resource}={self.target:g}"

    def bounds(self) -> tuple[float, float]:
        """The interval the usage must lie in."""
        slack = self.tolerance + _RTOL * max(1.0, abs(self.target))
        lower = -math.inf if self.form.startswith("max") else self.target - slack
        return lower, self.target + slack

    def weights(self, space: Space) -> np.ndarray:
        """Per-unit factor turning a resource value into its share of the usage."""
        has = ~np.isnan(self.table(space)[:, 0])
        if not self.is_average:
            return has.astype(float)
        return np.where(has, space.sizes, 0.0) / space.sizes[has].sum()

    def table(self, space: Space) -> np.ndarray:
        if self.resource not in space.resources:
            raise EvosearchError(
                f"{self}: the space has no resource {self.resource!r} (resources: {space.resources})"
            )
        return space.resource_table(self.resource)

    def contributions(self, space: Space) -> np.ndarray:
        """Share of the usage of each unit at each level (n_units x max_levels; 0 if absent)."""
        return np.nan_to_num(self.table(space)) * self.weights(space)[:, None]

    def usage_of(self, space: Space, indices: np.ndarray) -> float:
        return float(self.contributions(space)[np.arange(len(space.units)), indices].sum())

    def usage(self, space: Space, assignment: Assignment) -> float:
        return self.usage_of(space, space.indices(assignment))

    def is_met(self, space: Space, assignment: Assignment) -> bool:
        lower, upper = self.bounds()
        return lower <= self.usage(space, assignment) <= upper

    def range(self, space: Space) -> tuple[float, float]:
        """Smallest and largest usage any assignment reaches (exact: the usage is a sum)."""
        c = self.contributions(space)
        valid = np.arange(c.shape[1])[None, :] < space.n_levels[:, None]
        low = np.where(valid, c, np.inf).min(axis=1).sum()
        high = np.where(valid, c, -np.inf).max(axis=1).sum()
        return float(low), float(high)

    def check(self, space: Space) -> None:
        """Raise if the resource is unknown or no assignment can meet this budget."""
        low, high = self.range(space)
        lower, upper = self.bounds()
        if low > upper:
            raise EvosearchError(
                f"{self} is out of reach: this space needs at least {low:.4g} "
                f"(raise the budget or add levels)"
            )
        if high < lower:
            raise EvosearchError(
                f"{self} is out of reach: this space reaches at most {high:.4g} "
                f"(lower the budget or add levels)"
            )


class Feasibility:
    """A space's budgets, precomputed for fast checks of level-index vectors."""

    def __init__(self, space: Space, budgets: list[Budget]):
        self.space = space
        self.budgets = budgets
        self.contributions = np.stack([b.contributions(space) for b in budgets])  # B x units x levels
        self.lower, self.upper = np.array([b.bounds() for b in budgets]).T
        ranges = np.array([b.range(space) for b in budgets])
        self.scale = np.maximum(ranges[:, 1] - ranges[:, 0], 1e-12)
        self._rows = np.arange(len(space.units))

    def usages(self, indices: np.ndarray) -> np.ndarray:
        return self.contributions[:, self._rows, indices].sum(axis=1)

    def is_met(self, indices: np.ndarray) -> bool:
        usages = self.usages(indices)
        return bool(np.all((self.lower <= usages) & (usages <= self.upper)))

    def violation(self, usages: np.ndarray) -> np.ndarray:
        """Distance of usages (budgets on axis 0) from their bounds, each scaled by its range."""
        lower, upper, scale = (a.reshape(-1, *[1] * (usages.ndim - 1)) for a in (self.lower, self.upper, self.scale))
        return ((np.maximum(0.0, usages - upper) + np.maximum(0.0, lower - usages)) / scale).sum(axis=0)

    def repair(
        self, indices: np.ndarray, rng: np.random.Generator, anchor: np.ndarray | None
    ) -> np.ndarray | None:
        """Move units one level at a time until every budget holds.

        Each step picks, at random, one of the single-level moves that reduce the total
        `violation`, so an over-budget assignment steps down towards the cheaper levels
        of randomly chosen units and stops as soon as it is feasible. If no single move
        helps (budgets pulling apart, or an equality that no single step lands in),
        random units step towards `anchor`, a known feasible assignment, which ends
        there at worst (without an anchor, None is returned). Returns a new array; a
        feasible input comes back unchanged.
        """
        x = indices.copy()
        top = self.space.n_levels - 1
        while True:
            usages = self.usages(x)
            current = float(self.violation(usages))
            if current == 0.0:
                return x
            here = self.contributions[:, self._rows, x]
            down = self.contributions[:, self._rows, np.maximum(x - 1, 0)] - here
            up = self.contributions[:, self._rows, np.minimum(x + 1, top)] - here
            after = self.violation(usages[:, None, None] + np.stack([down, up], axis=2))
            after[x == 0, 0] = np.inf  # no level below the first
            after[x == top, 1] = np.inf  # nor above the last
            better = np.argwhere(after < current - 1e-12)
            if len(better) == 0:
                break
            unit, direction = better[rng.integers(len(better))]
            x[unit] += 1 if direction else -1
        if anchor is None:
            return None
        while not self.is_met(x):
            off = np.flatnonzero(x != anchor)
            unit = off[rng.integers(len(off))]
            x[unit] += np.sign(anchor[unit] - x[unit])
        return x

