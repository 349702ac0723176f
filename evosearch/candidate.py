"""A model that takes on any candidate assignment by in-place weight copies.

Compress once, swap many times: the values of a unit's parameters at a level come from its
kind (``Compression.tensors``: the database entry, the dense weights, zeros, a mask of the
dense weights...), and moving to a new assignment copies only the units whose level
changed, with ``param.data.copy_`` so that parameter storage never moves (CUDA graphs and
compiled code stay valid).
"""

from __future__ import annotations

import torch

from evosearch.database.store import Database
from evosearch.kinds.base import Dense, Level
from evosearch.problem import SearchProblem
from evosearch.units import Architecture

CHANGED = "changed"  # the state of a unit whose weights were changed outside ``apply``


class CandidateModel:
    def __init__(self, model, arch: Architecture, problem: SearchProblem, database: Database | None):
        self.model = model
        self.arch = arch
        self.problem = problem
        self.kind = problem.compression
        self.database = database
        self.device = next(model.parameters()).device
        self.params = dict(model.named_parameters())
        self.current: dict[str, Level | str] = {unit: Dense() for unit in problem.model_units}
        self.searching = True  # kinds may score a level differently during the search (``tensors``)
        self._resident: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # database entries on the device
        self._levels = {unit: {level.key for level in levels} for unit, levels in problem.levels.items()}
        self.dense: dict[str, torch.Tensor] = {}
        for unit, mu in problem.model_units.items():
            for name in self.kind.parameters(arch, mu):
                self.dense[name] = self.params[name].detach().clone()

    def get(self, unit: str, key: str, device=None) -> dict[str, torch.Tensor]:
        """A database entry, from the device when it is held there. Entries that are no level (a width
        unit's importance order) are small and read on every swap, so they are kept once read."""
        if (unit, key) in self._resident:
            return self._resident[unit, key]
        entry = self.database.get(unit, key, device=self.device)
        if key not in self._levels[unit]:
            self._resident[unit, key] = entry
        return entry

    def tensors(self, unit: str, level: Level) -> dict[str, torch.Tensor]:
        """The values of ``unit``'s parameters at ``level``."""
        return self.kind.tensors(self.arch, self.problem.model_units[unit], level, self.dense, self,
                                 device=self.device, searching=self.searching)

    def preload(self, max_bytes: float | None = None) -> int:
        """Keep the problem's stored levels on the model's device, so a swap is one device-to-device
        copy. Stops at ``max_bytes``; returns the bytes held."""
        held = sum(t.numel() * t.element_size() for entry in self._resident.values() for t in entry.values())
        for unit, levels in self.problem.levels.items():
            for level in levels:
                if not self.kind.stored(level) or (unit, level.key) in self._resident:
                    continue
                entry = self.database.get(unit, level.key, device=self.device)
                size = sum(t.numel() * t.element_size() for t in entry.values())
                if max_bytes is not None and held + size > max_bytes:
                    return held
                self._resident[unit, level.key] = entry
                held += size
        return held

    @torch.no_grad()
    def apply(self, assignment: dict) -> int:
        """Put the assignment's levels in place; returns how many units changed."""
        changed = 0
        for unit, label in assignment.items():
            level = self.problem.level(unit, label)
            if level == self.current[unit]:
                continue
            self._copy(unit, level)
            changed += 1
        return changed

    def _copy(self, unit: str, level: Level) -> None:
        for name, value in self.tensors(unit, level).items():
            self.params[name].data.copy_(value)
        self.current[unit] = level

    def end_search(self) -> None:
        """From here on levels take their final form (``searching=False``); copy every unit again."""
        self.searching = False
        self.mark_changed(self.problem.model_units)

    def mark_changed(self, units) -> None:
        """The weights of ``units`` were changed outside ``apply`` (reformed, say): copy them again next time."""
        for unit in units:
            self.current[unit] = CHANGED

    @torch.no_grad()
    def restore(self) -> None:
        """Back to the dense model (whether or not "dense" is one of the searched levels)."""
        for unit, level in self.current.items():
            if level != Dense():
                self._copy(unit, Dense())

    def levels(self) -> dict[str, Level]:
        """The level each unit holds now (``CHANGED`` for one changed outside ``apply``)."""
        return dict(self.current)
