"""What a compression kind is: a space spec that also knows how to build, apply, count and export its levels.

A *kind* (unstructured sparsity, N:M, bit-widths, sparsity with bit-widths, dropping
blocks, sub-network width, or one of your own) is one pydantic class, a subclass of
``Compression``: its fields are the ``compression:`` block of a space's YAML file (``kind:``
names it), and its methods are everything the rest of evosearch asks of that kind. The
engine, the database builder, the candidate model, export, the hardware tables, healing
and the report call these methods; none of them asks which kind it is.

What a kind answers, in the order a run needs it:

- ``problem``: the search problem for one model (which units, their levels, the resources
  of each level, the groups EvoPress switches within) via ``evosearch.problem.SearchProblem``;
- the database: ``database_identity`` (what its entries depend on), ``entries`` (what a
  unit needs stored), ``needs_hessians`` and ``build`` (compress a unit from its inputs'
  Hessians, block by block, see ``evosearch.database.build``);
- the candidate: ``parameters`` (what a unit's levels may change) and ``tensors`` (the
  values of those parameters at a level), see ``evosearch.candidate``;
- resources: ``unit_bytes`` (bytes on disk after export, from ``evosearch.layouts``),
  ``latency_class`` (the level whose timing a hardware table holds for it: what runs once
  exported, ``Level.runtime_module``), and ``measure`` (the budget's resource counted from
  the weights);
- after the search: ``refine`` (e.g. a width search's reformation), ``record`` (the kind's
  own sections of ``result.json``);
- ``export`` (what an export writes for each unit) and ``keep`` (what healing must leave
  as searched).

A level is a typed value (``Level``): its fields say exactly what it is, format included
(a 4-bit level with groups of 64 on a symmetric grid is ``Quant(bits=4, group_size=64,
symmetric=True)``). ``Level.key`` names its database entry (unchanged from the string keys
of earlier versions, so their databases stay valid) and ``Level.name`` names it fully, as
hardware tables and ``result.json`` do.

Adding a kind is one module: subclass ``Compression`` (and ``Level`` for new levels), then
``evosearch.kinds.register(YourKind)``. ``tests/test_kinds.py`` adds magnitude pruning at
fixed levels that way and searches and exports with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from evosearch.database.quantization import QuantFormat
from evosearch.levels import Dense, Drop, Level
from evosearch.problem import SearchProblem

if TYPE_CHECKING:
    from evosearch.database.hessian import Hessian
    from evosearch.database.quantization import QuantizedWeight
    from evosearch.database.store import Database
    from evosearch.units import Architecture, ModelUnit


# --- shared parts of specs -------------------------------------------------------------------------

class Reformation(BaseModel):
    """Least-squares rectification of a pruned layer's kept weights from calibration data
    (``evosearch.database.structured``): the paper's ADMM, or the exact closed form, which
    exists when whole input columns are kept (heads, channels) and is what ADMM converges to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["admm", "closed_form"] = "admm"
    rho: float = Field(0.3, gt=0, description="ADMM penalty, relative to the inputs' energy")
    iterations: int = Field(30, ge=1, description="ADMM iterations")
    damp: float = Field(0.01, ge=0, description="ridge added to H's diagonal, times its mean")


# --- what healing keeps ---------------------------------------------------------------------------

@dataclass
class Keep:
    """What training after the search (``evosearch.heal``) must leave as the search chose it."""

    zeros: set[str] = field(default_factory=set)  # linear layers whose zero weights stay zero
    frozen: set[str] = field(default_factory=set)  # linear layers left untrained (a dropped unit's)
    dropped: set[str] = field(default_factory=set)  # units that stay dropped
    formats: dict[str, tuple[QuantFormat, bool]] = field(default_factory=dict)  # linear -> (format, zeros kept)

    def __ior__(self, other: Keep) -> Keep:
        self.zeros |= other.zeros
        self.frozen |= other.frozen
        self.dropped |= other.dropped
        self.formats |= other.formats
        return self


# --- what export does -----------------------------------------------------------------------------

@dataclass
class ExportJob:
    """What export does to each unit, as the units' kind says (``Compression.export``), read by
    ``evosearch.export.export_model``."""

    model: torch.nn.Module  # the compressed model in memory, the assignment in place
    arch: Architecture
    kind: Compression | None = None  # the kind that planned the job (None: a job put together by hand)
    levels: dict[str, Level] = field(default_factory=dict)  # unit -> its level
    units: dict[str, ModelUnit] = field(default_factory=dict)  # unit -> the model part it stands for
    database: Database | None = None
    removed: set[str] = field(default_factory=set)  # block, attention or MLP unit names
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # linear name -> codes
    semi_structured: set[str] = field(default_factory=set)  # linear names with 2:4 sparse weights
    bitmask: dict[str, torch.Tensor] = field(default_factory=dict)  # linear name -> kept weights (bitmask layout)

    def __post_init__(self):
        if not self.units:
            found = {u.name: u for u in self.arch.units()}
            self.units = {name: found[name] for name in self.levels}

    @classmethod
    def for_problem(cls, model: torch.nn.Module, problem: SearchProblem, assignment: dict,
                    database: Database | None = None) -> ExportJob:
        """The job for an assignment of a search problem whose levels are in place in ``model``, planned by
        the problem's kind (``Compression.export``)."""
        job = cls(model, problem.arch, problem.compression, problem.typed(assignment), dict(problem.model_units),
                  database)
        job.kind.export(job)
        return job


# --- the kind -------------------------------------------------------------------------------------

class Compression(BaseModel):
    """A compression kind: the ``compression:`` block of a space, and its behaviour (module docstring).

    Defaults fit kinds whose units are linear layers and whose levels are weights stored in the
    database (``Dense`` is the layer as it is); a kind overrides what differs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    levels_types: ClassVar[tuple[type[Level], ...]] = (Dense,)  # the level types this kind makes

    # --- the search problem
    def problem(self, space, arch: Architecture, target: float | None) -> SearchProblem:
        """The search problem of ``space`` (a ``CompressionSpace`` holding this kind) for one model and
        the budget value ``target``; ``target=None``: levels that do not depend on it (for a budget on
        another resource, ``SearchProblem.with_budget``), or an EvosearchError if they do."""
        raise NotImplementedError

    def check_budget(self, value: float) -> None:
        """Refuse a ``--budget`` value out of this kind's range for every model, before a model is loaded
        (``problem`` checks the rest against the model)."""

    # --- the database
    def database_identity(self) -> dict:
        """What this kind's database entries depend on besides the model and calibration text."""
        return {"compression": self.kind, "method": getattr(self, "method", None)}

    def needs_hessians(self) -> bool:
        return True

    def stored(self, level: Level) -> bool:
        """Whether ``tensors`` reads the level from the database (and ``build`` must make it)."""
        return not isinstance(level, (Dense, Drop))

    def entries(self, unit: ModelUnit, levels: list[Level]) -> list[str]:
        """The database entries ``unit`` needs for ``levels``."""
        return [level.key for level in levels if self.stored(level)]

    def build(self, arch: Architecture, unit: ModelUnit, hessians: dict[str, Hessian], missing: list[str],
              levels: list[Level], database: Database) -> None:
        """Put the ``missing`` entries of ``unit`` (whose levels are ``levels``) into ``database``;
        ``hessians``: of every linear layer's input in the unit's block, from the dense model's
        calibration activations."""
        raise NotImplementedError

    # --- the candidate
    def parameters(self, arch: Architecture, unit: ModelUnit) -> list[str]:
        """Names of the model parameters that a unit's levels may change."""
        return linear_parameters(arch, unit.linears)

    def tensors(self, arch: Architecture, unit: ModelUnit, level: Level, dense: dict[str, torch.Tensor],
                database: Database, *, device, searching: bool = True) -> dict[str, torch.Tensor]:
        """The values of ``parameters`` (by name) at ``level``; ``dense`` holds their dense values.
        ``searching`` is False once the search is over (a kind may score levels differently during it)."""
        if isinstance(level, Dense):
            return {name: dense[name] for name in self.parameters(arch, unit)}
        return database.get(unit.name, level.key, device=device)

    # --- resources
    def unit_bytes(self, arch: Architecture, unit: ModelUnit, level: Level) -> int:
        """Bytes the unit takes in an export at ``level`` (0 when removed)."""
        return level.bytes(arch, unit)

    def latency_class(self, level: Level) -> Level:
        """The level whose measured timing stands for ``level`` in a hardware table: what runs once
        exported (``Level.runtime_module``); ``Drop`` costs nothing."""
        return level

    def measure(self, arch: Architecture, problem: SearchProblem, levels: dict[str, Level]) -> dict[str, float]:
        """Resources of the searched units counted from the model's weights (not from the plan)."""
        return {}

    def kept_parameters(self, arch: Architecture, problem: SearchProblem) -> int:
        """Non-zero parameters left in the searched units (a removed unit keeps none)."""
        return sum(int(torch.count_nonzero(p)) for mu in problem.model_units.values() for name in mu.linears
                   for p in arch.module(name).parameters())

    # --- after the search
    def refine(self, problem: SearchProblem, candidate, calibration: torch.Tensor, *, progress: bool) -> dict | None:
        """Improve the chosen levels in place after the search (calibration sequences given); None: nothing to do."""
        return None

    def record(self, arch: Architecture, problem: SearchProblem, levels: dict[str, Level],
               measured: dict[str, float]) -> dict:
        """This kind's own sections of ``result.json`` (e.g. ``quantization``), from the model in place
        (``measured``: what ``measure`` counted)."""
        return {}

    # --- export and healing
    def export(self, job: ExportJob) -> None:
        """Say in ``job`` what export does with each unit (remove, pack, flag); nothing by default."""

    def keep(self, arch: Architecture, unit: ModelUnit, level: Level) -> Keep:
        """What healing must keep of ``unit`` at ``level``: by default its zero weights stay zero."""
        return Keep(zeros=set(unit.linears))


def linear_parameters(arch: Architecture, linears) -> list[str]:
    """The weight (and bias) names of the given linear layers."""
    return [f"{name}.{p}" for name in linears for p, _ in arch.module(name).named_parameters()]
