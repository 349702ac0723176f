"""Levels: what a unit becomes. ``Level`` is the base of every kind's levels; ``Dense`` and ``Drop``
are shared by all kinds (``evosearch.kinds.base`` says what a kind does with them).

A level is a frozen pydantic value: its fields say exactly what it is (``Quant(bits=4,
group_size=64, symmetric=True)``), ``name`` spells it whole and ``key`` names its database entry.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from evosearch.errors import EvosearchError

if TYPE_CHECKING:
    from evosearch.units import Architecture, ModelUnit


class Level(BaseModel):
    """One level of one unit: what the unit becomes. Frozen and hashable; ``type`` tags it in JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ClassVar[str]
    name_pattern: ClassVar[re.Pattern | None] = None  # how ``name`` is read back (``from_name``)

    @property
    def key(self) -> str:
        """The database entry that holds this level's tensors (one per unit)."""
        return self.name

    @property
    def name(self) -> str:
        """The level, fully, in one string: ``dense``, ``zeros=1024``, ``2:4``, ``bits=4,group=64,sym``."""
        raise NotImplementedError

    @classmethod
    def from_name(cls, name: str) -> Level | None:
        """The level ``name`` spells, if it is one of this type's names."""
        return None

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, **self.model_dump()}

    def applies_to(self, unit: ModelUnit) -> bool:
        """Whether units of this kind (``unit.kind``: linear, attention, mlp, block) can run at this level."""
        return False

    def runtime_module(self, arch: Architecture, unit: ModelUnit, device: torch.device):
        """The module that runs for ``unit`` at this level once exported (for ``evosearch profile``), or None
        where nothing runs it faster than the dense one here (then it runs dense)."""
        raise EvosearchError(f"no latency model for {unit.kind} units at {self.name!r}")

    def bytes(self, arch: Architecture, unit: ModelUnit) -> int:
        """Bytes ``unit`` takes in an export at this level: stored dense by default (``evosearch.layouts``)."""
        from evosearch.layouts import dense_bytes

        return dense_bytes(arch, unit)

    def __str__(self) -> str:
        return self.name


class Dense(Level):
    """The unit as it is."""

    type: ClassVar[str] = "dense"

    @property
    def name(self) -> str:
        return "dense"

    @classmethod
    def from_name(cls, name: str) -> Level | None:
        return cls() if name == "dense" else None

    def applies_to(self, unit: ModelUnit) -> bool:
        return True

    def runtime_module(self, arch: Architecture, unit: ModelUnit, device: torch.device):
        return arch.sub_block(unit)


class Drop(Level):
    """The unit removed: its output contributes nothing (the residual stream passes through)."""

    type: ClassVar[str] = "drop"

    @property
    def name(self) -> str:
        return "drop"

    @classmethod
    def from_name(cls, name: str) -> Level | None:
        return cls() if name == "drop" else None

    def bytes(self, arch: Architecture, unit: ModelUnit) -> int:
        return 0  # removed, norms and all
