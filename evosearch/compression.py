"""Compression spaces for language models: what may change in a model, as data.

A ``CompressionSpace`` (a YAML file in ``spaces/`` or a Python object) is a compression
kind (``compression:``, one of ``evosearch.kinds.KINDS``: which units of a model are
searched, what their levels are, how they are built), how ``--budget VALUE`` is read
(``budget:``), and defaults for the sampler and the report's baselines. ``materialize``
asks the kind for the search problem of one model and one budget value
(``evosearch.problem.SearchProblem``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from evosearch.errors import EvosearchError, first_problem
from evosearch.kinds import Compression, parse_kind
from evosearch.problem import BudgetSpec, SearchProblem
from evosearch.units import Architecture


def _spaces_dir() -> Path:
    """The ready spaces: ``spaces/`` in a checkout, ``evosearch/spaces/`` in an installed wheel (a namespace
    package: a folder without ``__init__.py``, see ``evosearch/__init__.py``)."""
    return Path(next(iter(importlib.util.find_spec("evosearch.spaces").submodule_search_locations)))


class CompressionSpace(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    description: str = ""
    compression: SerializeAsAny[Compression]
    budget: BudgetSpec
    sampler: dict = Field(default_factory=dict, description="default sampler options for this space")
    baselines: list[str] = Field(default_factory=list,
                                 description="samplers whose answer the report sets beside the search's (uniform, owl...)")

    @field_validator("compression", mode="before")
    @classmethod
    def _kind(cls, value: Any) -> Compression:
        return parse_kind(value)

    @classmethod
    def load(cls, name_or_path: str | Path) -> CompressionSpace:
        """A ready space by name (``sparsity``, ``drop``, ...) or a YAML file."""
        path = Path(name_or_path)
        if not path.suffix and not path.exists():
            path = _spaces_dir() / f"{name_or_path}.yaml"
            if not path.exists():
                raise EvosearchError(f"space {str(name_or_path)!r} is not a file or a ready space; ready spaces: "
                                     f"{', '.join(ready_spaces())}")
        elif not path.exists():
            raise EvosearchError(f"space file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise EvosearchError(f"space file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        return cls.parse(data, f"space file {path}")

    @classmethod
    def parse(cls, data: Any, source: str = "space") -> CompressionSpace:
        """A space from its mapping (a YAML file's, or ``result.json``'s record of one)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise EvosearchError(f"{source}: {first_problem(exc)}") from None

    def check_budget(self, value: float) -> None:
        """Refuse a ``--budget`` outside the range its reading and kind have for every model (no model is
        needed: the search checks it before loading one); ``materialize`` checks the rest against the model."""
        if self.budget.form == "fraction_of_units" and not 0 <= value < 1:
            raise EvosearchError(f"--budget {value:g} must be a fraction of the units in [0, 1) (1 removes every one)")
        self.compression.check_budget(value)

    def materialize(self, arch: Architecture, budget_value: float | None) -> SearchProblem:
        """The search problem for one model and budget value; ``None``: the problem's units and levels
        where they do not depend on the budget's value, for a budget on another resource
        (``SearchProblem.with_budget``), its own budget a placeholder until then."""
        if budget_value is not None:
            self.check_budget(budget_value)
        return self.compression.problem(self, arch, budget_value)


def ready_spaces() -> list[str]:
    return sorted(p.stem for p in _spaces_dir().glob("*.yaml"))
