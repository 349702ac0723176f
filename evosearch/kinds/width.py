"""Sub-network width ("Search for Efficient Large Language Models", Shen et al. 2024).

Per attention block, how many key/value-head groups it keeps (a group is one KV head and
the query heads that share it, so every sub-network is a plain GQA layer); per MLP, how
many channels, in steps of ``granularity``. Which groups and channels are kept follows the
paper's importance score (``evosearch.subnetwork``), so narrower levels keep a subset of the
wider ones: the database stores each unit's importance ``order`` and, for ``fitness:
reformed``, each level's rectified output projection. ``min_keep`` is the narrowest a block
may become; 0 adds the empty level, i.e. dropping the block (the drop x width space).

A level is ``Width(kept, of)``: ``kept`` KV heads (``of="kv_heads"``) or channels
(``of="channels"``); the full width is ``Dense`` and none is ``Drop``. In the search a level
zeroes the pruned groups' rows of the input projections and columns of the output
projection (``fitness: masked``), or takes the rectified output projection from the
database (``reformed``). The chosen sub-network is always rectified afterwards (``refine``:
``reform``, block by block on the compressed model's own inputs), and export slices the
pruned heads and channels away.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from evosearch import subnetwork
from evosearch.database.structured import reform_closed_form
from evosearch.errors import EvosearchError
from evosearch.kinds.base import Compression, Dense, Drop, Keep, Level, Reformation, linear_parameters
from evosearch.kinds.drop import dropped_keep
from evosearch.problem import SearchProblem, make_budget, spread
from evosearch.space import Space, Unit

ORDER = "order"  # the database entry holding a unit's groups from most to least important


class Width(Level):
    """A sub-block narrowed to ``kept`` key/value heads (attention) or channels (MLP)."""

    type: ClassVar[str] = "width"
    name_pattern: ClassVar[re.Pattern] = re.compile(r"^(kv_heads|channels)=(\d+)$")
    kept: int
    of: Literal["kv_heads", "channels"]

    @property
    def name(self) -> str:
        return f"{self.of}={self.kept}"

    @classmethod
    def from_name(cls, name: str) -> Level | None:
        match = cls.name_pattern.match(str(name))
        return cls(of=match[1], kept=int(match[2])) if match else None

    def bytes(self, arch, unit) -> int:
        """The narrowed sub-block's weights as export slices them, and its norm."""
        itemsize = arch.module(unit.linears[0]).weight.element_size()  # kept: KV groups, or single channels
        return (subnetwork.unit_parameters(arch, unit, self.kept) * itemsize
                + sum(p.numel() * p.element_size() for p in arch.other_parameters(unit)))


class WidthSpace(Compression):
    """Structured sub-networks (see the module docstring).

    ``fitness`` says how candidates are scored during the search: ``masked`` (pruned
    heads and channels zeroed, nothing rectified) or ``reformed`` (each level's output
    projection rectified in closed form in the database). The chosen sub-network is
    always rectified afterwards with ``reform``.
    """

    kind: Literal["width"] = "width"
    units: list[Literal["attention", "mlp"]] = ["attention", "mlp"]
    granularity: int = Field(64, ge=1, description="MLP channels per level step")
    min_keep: float = Field(0.25, ge=0, lt=1, description="narrowest width, as a fraction of the block's")
    fitness: Literal["masked", "reformed"] = "masked"
    reform: Reformation = Reformation()
    levels_types: ClassVar = (Dense, Width, Drop)

    @field_validator("units")
    @classmethod
    def _check_units(cls, units):
        if not units or len(set(units)) != len(units):
            raise ValueError("list attention, mlp or both, once each")
        return units

    def database_identity(self) -> dict:
        identity = super().database_identity()
        if self.fitness == "reformed":  # a masked search's database holds importance orders only
            identity["reform"] = self.reform.model_dump()
        return identity

    def check_budget(self, value):
        if not 0 < value <= 1:  # 0 keeps nothing: every block removed
            raise EvosearchError(f"--budget {value:g} must be a fraction of the searched blocks' parameters kept, "
                                 f"in (0, 1]")

    # --- the problem
    def problem(self, space, arch, target):
        """Per block one unit per kind, its levels the widths in steps; level 0 is the uniform width.

        A level label is the number of steps (one KV group, or ``granularity`` channels) by which
        a block is narrower than its uniform width, as EvoPress names sparsity levels by their
        step from the target: all units at level 0 is the uniform sub-network, and a level
        switch between two blocks of one kind keeps the parameter count exactly. The uniform
        width keeps the budget's fraction of the KV groups and of the MLP channels, each
        rounded to whole steps and spread evenly over the blocks (widths differ by at most one
        step between blocks); the budget is met to within half a step of the last kind.

        Switches never trade attention for MLP (their steps differ in size), so the problem
        also offers ``starts``: uniform widths whose attention keeps a larger or smaller
        fraction than the budget's, the MLP filling the rest. EvoPress starts from the best
        of them, so the split between attention and MLP is searched too.
        """
        if (space.budget.resource, space.budget.form) != ("kept", "average"):
            raise EvosearchError("a width space's budget is {resource: kept, form: average}: --budget is the "
                                 "fraction of the searched blocks' parameters kept")
        if target is None:
            raise EvosearchError("a width space's levels are spaced around its budget, the fraction of parameters "
                                 "kept; a latency or bytes budget needs another space")
        model_units = arch.units(tuple(self.units))
        members = {kind: [u for u in model_units if u.kind == kind] for kind in self.units}
        kinds = {}  # kind -> (step in groups, steps in a full block, fewest steps allowed)
        for kind in self.units:
            groups = subnetwork.layout(arch, members[kind][0]).groups
            step = 1 if kind == "attention" else self.granularity
            if groups % step:
                raise EvosearchError(f"granularity {step} does not divide the MLP's {groups} channels; choose a "
                                     f"divisor of {groups}")
            full = groups // step
            kinds[kind] = (step, full, min(full, math.ceil(self.min_keep * full - 1e-9)))
        params = {u.name: [subnetwork.unit_parameters(arch, u, k * kinds[u.kind][0]) for k in range(kinds[u.kind][1] + 1)]
                  for u in model_units}
        dense = sum(p[-1] for p in params.values())
        lowest = sum(params[u.name][kinds[u.kind][2]] for u in model_units) / dense
        if not lowest <= target <= 1:
            raise EvosearchError(f"--budget {target} is outside this space's range [{lowest:.3f}, 1] of the fraction "
                                 f"of parameters kept (min_keep {self.min_keep})")

        def uniform(first: float) -> dict[str, int]:
            """Steps kept per unit: the first kind keeps the fraction ``first`` of its steps, the last fills the budget."""
            keep = {}
            for i, kind in enumerate(self.units):
                _, full, low = kinds[kind]
                n = len(members[kind])
                if i + 1 < len(self.units):
                    totals = [min(max(round(first * full * n), low * n), full * n)]
                else:
                    totals = range(low * n, full * n + 1)
                rest = target * dense - sum(params[name][k] for name, k in keep.items())
                spreads = [spread(total, n) for total in totals]
                best = min(spreads, key=lambda ks: abs(sum(params[u.name][k] for u, k in zip(members[kind], ks)) - rest))
                keep |= {u.name: k for u, k in zip(members[kind], best)}
            return keep

        last = self.units[-1]
        rounding = (params[members[last][0].name][-1] - params[members[last][0].name][-2]) / 2 / dense * (1 + 1e-6)
        centre = uniform(target)
        units, levels = [], {}
        for u in model_units:
            step, full, low = kinds[u.kind]
            keeps = list(range(full, low - 1, -1))  # widest first: levels go from least to most compressed
            units.append(Unit(name=u.name, levels=[centre[u.name] - k for k in keeps], size=params[u.name][-1],
                              group=u.kind, resources={"kept": [params[u.name][k] / params[u.name][-1] for k in keeps],
                                                       "params": [float(params[u.name][k]) for k in keeps]}))
            of = "kv_heads" if u.kind == "attention" else "channels"
            levels[u.name] = [Dense() if k == full else Drop() if k == 0 else Width(kept=k * step, of=of)
                              for k in keeps]
        searched = Space(units=units, name=space.name, description=space.description)
        budget = make_budget(space.budget, searched, target, rounding)
        starts = []
        if len(self.units) > 1:
            half = (1 - target) / 2
            for first in sorted({max(0.0, target - half), target, target + half, 1.0}):
                keep = uniform(first)
                start = {u.name: centre[u.name] - keep[u.name] for u in model_units}
                if budget.is_met(searched, start) and start not in starts:
                    starts.append(start)
        return SearchProblem(space, arch, searched, budget, {u.name: u for u in model_units}, levels, starts)

    # --- the database
    def stored(self, level):
        return isinstance(level, Width) and self.fitness == "reformed"

    def entries(self, unit, levels):
        return [ORDER] + super().entries(unit, levels)

    def build(self, arch, unit, hessians, missing, levels, database):
        """A unit's importance order and, for a reformed search, each level's output projection
        rectified in closed form (exact for kept columns; the final sub-network gets ``reform``)."""
        lay = subnetwork.layout(arch, unit)
        if ORDER in missing:
            scores = subnetwork.importance(arch, unit, {name: hessians[name].H for name in (*lay.inputs, lay.output)})
            database.put(unit.name, ORDER, {ORDER: subnetwork.importance_order(scores)})
        W = arch.module(lay.output).weight
        order = database.get(unit.name, ORDER, device=W.device)[ORDER]
        by_key = {level.key: level for level in levels}
        for key in missing:
            if key == ORDER:
                continue
            kept = subnetwork.kept_by_order(order, by_key[key].kept)
            columns = kept.repeat_interleave(lay.columns)
            W_hat = reform_closed_form(W, hessians[lay.output].H, columns, damp=self.reform.damp)
            database.put(unit.name, key, {f"{lay.output}.weight": W_hat.to(W.dtype)})

    # --- the candidate
    def parameters(self, arch, unit):
        return linear_parameters(arch, unit.linears)

    def tensors(self, arch, unit, level, dense, database, *, device, searching=True):
        values = {name: dense[name] for name in self.parameters(arch, unit)}
        if isinstance(level, Dense):
            return values
        if isinstance(level, Drop):
            return {name: v.new_zeros(v.shape) for name, v in values.items()}
        order = database.get(unit.name, ORDER, device=device)[ORDER]
        lay = subnetwork.layout(arch, unit)
        masked = subnetwork.masked(lay, subnetwork.kept_by_order(order, level.kept), values)
        if searching and self.fitness == "reformed":
            masked |= database.get(unit.name, level.key, device=device)
        return masked

    # --- resources
    def measure(self, arch, problem, levels):
        units = list(problem.model_units.values())
        return {"kept": subnetwork.kept_parameters(arch, units) / sum(mu.params for mu in units)}

    def kept_parameters(self, arch, problem):
        return subnetwork.kept_parameters(arch, list(problem.model_units.values()))

    # --- after the search
    def refine(self, problem, candidate, calibration, *, progress):
        """Reform the sub-network in place: each partly pruned output projection solved for by least
        squares on the compressed model's own inputs (``subnetwork.reform_subnetwork``)."""
        record = subnetwork.reform_subnetwork(candidate.model, problem.arch, list(problem.model_units.values()),
                                              candidate.dense, calibration, self.reform, progress=progress)
        candidate.mark_changed(problem.model_units)
        return record | self.reform.model_dump()

    def record(self, arch, problem, levels, measured):
        return {"widths": subnetwork.block_widths(arch, list(problem.model_units.values()))}

    # --- export and healing
    def export(self, job):
        """Pruned heads and channels are zero columns of the output projections: slice them away."""
        job.removed |= subnetwork.slice_to_kept(job.arch, [job.units[unit] for unit in job.levels])

    def keep(self, arch, unit, level):
        return dropped_keep(arch, unit) if isinstance(level, Drop) else Keep(zeros=set(unit.linears))
