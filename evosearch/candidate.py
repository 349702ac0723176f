"""A model that takes on any candidate assignment by in-place weight copies.

Compress once, swap many times: every level's weights come from the database (or, for
"dense" and "drop", from a copy of the dense weights and from zeros), and moving to a new
assignment copies only the units whose level changed, with ``param.data.copy_`` so that
parameter storage never moves (CUDA graphs and compiled code stay valid).

A dropped attention or MLP block has its output projection zeroed: the residual stream
passes through unchanged, exactly as if the block were removed. The block still runs
during the search; export removes it for real.

A sub-network level (width spaces) zeroes the pruned groups' rows of the input
projections and columns of the output projection, computed from the dense weights and
the importance order stored in the database; with ``fitness: reformed`` the output
projection comes from the database, rectified for that width.
"""

from __future__ import annotations

import torch

from evosearch import subnetwork
from evosearch.compression import SearchProblem, WidthSpace
from evosearch.database.store import Database
from evosearch.units import Architecture


class CandidateModel:
    def __init__(self, model, arch: Architecture, problem: SearchProblem, database: Database | None):
        self.model = model
        self.arch = arch
        self.problem = problem
        self.database = database
        self.device = next(model.parameters()).device
        self.params = dict(model.named_parameters())
        self.current = {unit: "dense" for unit in problem.keys}
        self._resident: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # database entries on the device
        self.width = isinstance(problem.spec.compression, WidthSpace)
        # Width levels take their output projection from the database (rectified) or mask the dense one.
        self.reformed_levels = self.width and problem.spec.compression.fitness == "reformed"
        self._orders: dict[str, torch.Tensor] = {}
        self.dense: dict[str, torch.Tensor] = {}
        for unit in problem.keys:
            for name in self._touched(unit):
                self.dense[name] = self.params[name].detach().clone()

    def _touched(self, unit: str) -> list[str]:
        """Names of the parameters a unit's levels may change."""
        mu = self.problem.model_units[unit]
        if mu.kind == "linear":
            linears = [unit]
        else:
            outputs = {"attention": [self.arch.attention_linears(mu.block)[1]],
                       "mlp": [self.arch.mlp_linears(mu.block)[1]],
                       "block": [self.arch.attention_linears(mu.block)[1], self.arch.mlp_linears(mu.block)[1]]}
            dropping = "drop" in self.problem.keys[unit] and not self.width
            linears = outputs[mu.kind] if dropping else list(mu.linears)
        return [f"{name}.{p}" for name in linears for p in ("weight", "bias") if f"{name}.{p}" in self.params]

    def tensors(self, unit: str, key: str) -> dict[str, torch.Tensor]:
        """The parameter values of ``unit`` at the level stored under ``key``."""
        if key == "dense":
            return {name: self.dense[name] for name in self._touched(unit)}
        if key == "drop":
            return {name: torch.zeros_like(self.dense[name]) for name in self._touched(unit)}
        if self.width:
            return self._width_tensors(unit, key)
        if (unit, key) in self._resident:
            return self._resident[unit, key]
        return self.database.get(unit, key, device=self.device)

    def _width_tensors(self, unit: str, key: str) -> dict[str, torch.Tensor]:
        if unit not in self._orders:
            self._orders[unit] = self.database.get(unit, "order", device=self.device)["order"]
        lay = subnetwork.layout(self.arch, self.problem.model_units[unit])
        kept = subnetwork.kept_by_order(self._orders[unit], int(key.split("=")[1]))
        values = subnetwork.masked(lay, kept, {name: self.dense[name] for name in self._touched(unit)})
        if self.reformed_levels:
            values |= self.database.get(unit, key, device=self.device)
        return values

    def preload(self, max_bytes: float | None = None) -> int:
        """Keep every database entry of the problem on the model's device, so a swap is one
        device-to-device copy. Stops at ``max_bytes``; returns the bytes held.

        Width levels are masks of the dense weights kept here already, so they hold nothing."""
        if self.width:
            return 0
        held = sum(t.numel() * t.element_size() for entry in self._resident.values() for t in entry.values())
        for unit, keys in self.problem.keys.items():
            for key in keys:
                if key in ("dense", "drop") or (unit, key) in self._resident:
                    continue
                entry = self.database.get(unit, key, device=self.device)
                size = sum(t.numel() * t.element_size() for t in entry.values())
                if max_bytes is not None and held + size > max_bytes:
                    return held
                self._resident[unit, key] = entry
                held += size
        return held

    @torch.no_grad()
    def apply(self, assignment: dict) -> int:
        """Put the assignment's levels in place; returns how many units changed."""
        changed = 0
        for unit, level in assignment.items():
            key = self.problem.key(unit, level)
            if key == self.current[unit]:
                continue
            for name, value in self.tensors(unit, key).items():
                self.params[name].data.copy_(value)
            self.current[unit] = key
            changed += 1
        return changed

    def mark_changed(self, units) -> None:
        """The weights of ``units`` were changed outside ``apply`` (reformed, say): copy them again next time."""
        for unit in units:
            self.current[unit] = "changed"

    @torch.no_grad()
    def restore(self) -> None:
        """Back to the dense model (whether or not "dense" is one of the searched levels)."""
        for unit, key in self.current.items():
            if key != "dense":
                for name, value in self.tensors(unit, "dense").items():
                    self.params[name].data.copy_(value)
                self.current[unit] = "dense"
