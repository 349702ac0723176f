"""Compression spaces for language models: what may change in a model, as data.

A ``CompressionSpace`` (a YAML file in ``spaces/`` or a Python object) says which units
of a model are searched (linear layers, attention or MLP blocks), what their levels are
(sparsities, bit-widths, keep/drop, widths) and how they are built (SparseGPT, Wanda,
GPTQ, importance-ordered sub-networks...).
``materialize`` turns it, for one model and one budget value, into the generic search
problem: an ``evosearch.Space`` of named units with per-level resources, the ``Budget``,
and for every (unit, level) the key under which the database stores its weights.

Level spacing follows EvoPress: sparsity levels step by an equal *number of weights*
around the target, in every layer, so raising one layer a level and lowering another
keeps the total number of zeros exactly where it is.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evosearch.database.quantization import QuantFormat, packed_bytes
from evosearch.errors import EvosearchError
from evosearch.space import Budget, Space, Unit
from evosearch.units import Architecture, ModelUnit


def _spaces_dir() -> Path:
    """The ready spaces: ``spaces/`` in a checkout, ``evosearch/spaces/`` in an installed wheel (a namespace
    package: a folder without ``__init__.py``, see ``evosearch/__init__.py``)."""
    import evosearch.spaces

    return Path(next(iter(evosearch.spaces.__path__)))


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AroundTarget(_Spec):
    """EvoPress spacing: ``steps`` levels on each side of the target sparsity.

    One step removes ``step`` x (mean size of the searched layers) weights from a layer,
    the same number in every layer, so level switches keep the total exactly. Levels are
    named by their step from the target: level 0 is the uniform one, -2 two steps denser.
    """

    steps: int = Field(8, ge=1, le=64)
    step: float = Field(0.05, gt=0, le=1)


NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


class Reformation(_Spec):
    """Least-squares rectification of a pruned layer's kept weights from calibration data
    (``evosearch.database.structured``): the paper's ADMM, or the exact closed form, which
    exists when whole input columns are kept (heads, channels) and is what ADMM converges to."""

    method: Literal["admm", "closed_form"] = "admm"
    rho: float = Field(0.3, gt=0, description="ADMM penalty, relative to the inputs' energy")
    iterations: int = Field(30, ge=1, description="ADMM iterations")
    damp: float = Field(0.01, ge=0, description="ridge added to H's diagonal, times its mean")


class SparsitySpace(_Spec):
    kind: Literal["sparsity"] = "sparsity"
    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    units: Literal["linear"] = "linear"
    levels: Union[AroundTarget, list[Union[float, str]]] = AroundTarget()
    max_sparsity: float = Field(0.95, gt=0, lt=1)
    reform: Reformation | None = Field(None, description="rectify every pruned layer's kept weights after pruning")

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
                    match = NM_PATTERN.match(level)
                    if not match or int(match[1]) >= int(match[2]):
                        raise ValueError(f"level {level!r} is not an N:M pattern like '2:4' (N zeros in every M)")
                elif not 0 <= level < 1:
                    raise ValueError(f"sparsity level {level} is outside [0, 1)")
        return levels


class DropSpace(_Spec):
    kind: Literal["drop"] = "drop"
    units: list[Literal["attention", "mlp", "block"]] = ["attention", "mlp"]

    @field_validator("units")
    @classmethod
    def _check_units(cls, units):
        if "block" in units and len(units) > 1:
            raise ValueError("drop either whole blocks or attention/MLP blocks, not both")
        return units


class QuantizationSpace(_Spec):
    """A bit-width per linear layer, every level built by GPTQ (or round-to-nearest) in one format.

    Layers are grouped by shape, so an EvoPress level switch trades a bit between two
    layers of equal size and keeps the average bit-width exactly (with equally spaced
    ``bits``). The database identity holds the format, so another group size, grid or
    method never reuses entries.
    """

    kind: Literal["quantization"] = "quantization"
    method: Literal["rtn", "gptq"] = "gptq"
    units: Literal["linear"] = "linear"
    bits: list[int] = [2, 3, 4, 5, 6]
    group_size: int | None = Field(128, ge=1, description="input columns per scale; null = one group per row")
    symmetric: bool = False
    act_order: bool = Field(False, description="GPTQ: quantise the inputs with the largest Hessian diagonal first")

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, bits):
        if not bits or len(set(bits)) != len(bits) or not all(2 <= b <= 8 for b in bits):
            raise ValueError(f"bits must be distinct bit-widths from 2 to 8, like [2, 3, 4], got {bits}")
        return sorted(bits, reverse=True)  # least compressed first

    def format(self, bits: int) -> QuantFormat:
        return QuantFormat(bits, self.group_size, self.symmetric)

    def format_identity(self) -> dict:
        """What the database's entries depend on besides their key."""
        return self.model_dump(exclude={"kind", "units", "bits", "sparsity"})  # keys hold bits and zeros


class SparsityQuantSpace(QuantizationSpace):
    """Joint levels: a (sparsity, bit-width) pair per linear layer, pruned then quantised.

    Each layer is pruned (SparseGPT by default) to every sparsity, then each pruned
    weight is quantised to every bit-width with its zeros kept: GPTQ runs with the
    pruning mask fixed (see ``GPTQ``), and round-to-nearest keeps zeros because 0 is
    on every grid. A level's cost is the bytes ``--format packed`` writes for it
    (``packed_bytes``): the smaller of the dense layout (every code, int32 words per row)
    and the bitmask layout (a uint8 bitmask of the kept weights and their codes only, one
    int32 bit stream), both with float32 scales, packed zero points and the shape. A
    (sparsity, bits) pair whose bitmask layout is no smaller than the dense one in any
    layer is left out (roughly sparsity x bits <= 1: the mask's bit per weight pays for
    nothing), since the denser level at the same bit-width costs the same. Levels are
    named like ``50%@4bit`` and ordered by bytes, most first.
    """

    kind: Literal["sparsity-quant"] = "sparsity-quant"
    pruning: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    sparsity: list[float] = [0.0, 0.25, 0.5]

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, sparsity):
        if not sparsity or len(set(sparsity)) != len(sparsity) or not all(0 <= s < 1 for s in sparsity):
            raise ValueError(f"sparsity must be distinct fractions in [0, 1), like [0.0, 0.5], got {sparsity}")
        return sorted(sparsity)


class WidthSpace(_Spec):
    """Structured sub-networks ("Search for Efficient Large Language Models", Shen et al. 2024).

    Per attention block, how many key/value-head groups it keeps (a group is one KV head
    and the query heads that share it, so every sub-network is a plain GQA layer); per
    MLP, how many channels, in steps of ``granularity``. Which groups and channels are
    kept follows the paper's importance score (``evosearch.subnetwork``), so narrower
    levels keep a subset of the wider ones. ``min_keep`` is the narrowest a block may
    become; 0 adds the empty level, i.e. dropping the block (the drop x width space).

    ``fitness`` says how candidates are scored during the search: ``masked`` (pruned
    heads and channels zeroed, nothing rectified) or ``reformed`` (each level's output
    projection rectified in closed form in the database). The chosen sub-network is
    always rectified afterwards with ``reform``, block by block on the compressed
    model's own inputs.
    """

    kind: Literal["width"] = "width"
    units: list[Literal["attention", "mlp"]] = ["attention", "mlp"]
    granularity: int = Field(64, ge=1, description="MLP channels per level step")
    min_keep: float = Field(0.25, ge=0, lt=1, description="narrowest width, as a fraction of the block's")
    fitness: Literal["masked", "reformed"] = "masked"
    reform: Reformation = Reformation()

    @field_validator("units")
    @classmethod
    def _check_units(cls, units):
        if not units or len(set(units)) != len(units):
            raise ValueError("list attention, mlp or both, once each")
        return units


class BudgetSpec(_Spec):
    """How ``--budget VALUE`` is read: the resource, and whether VALUE is an average or a fraction of units."""

    resource: str
    form: Literal["average", "fraction_of_units", "max_average", "max_total"] = "average"
    tolerance: float = Field(0.0, ge=0, description="how far an equality budget may be missed")


class CompressionSpace(_Spec):
    name: str = ""
    description: str = ""
    compression: Annotated[Union[SparsitySpace, DropSpace, QuantizationSpace, SparsityQuantSpace, WidthSpace],
                           Field(discriminator="kind")]
    budget: BudgetSpec
    sampler: dict = Field(default_factory=dict, description="default sampler options for this space")
    baselines: list[str] = Field(default_factory=list,
                                 description="samplers whose answer the report sets beside the search's (uniform, owl...)")

    @classmethod
    def load(cls, name_or_path: str | Path) -> "CompressionSpace":
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
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"])
            raise EvosearchError(f"space file {path}: {where}: {error['msg']}") from None

    def check_budget(self, value: float) -> None:
        """Refuse a ``--budget`` outside the range its kind has for every model (no model is needed:
        the search checks it before loading one); ``materialize`` checks the rest against the model."""
        comp = self.compression
        if self.budget.form == "fraction_of_units" and not 0 <= value < 1:
            raise EvosearchError(f"--budget {value:g} must be a fraction of the units in [0, 1) (1 removes every one)")
        if isinstance(comp, SparsitySpace) and isinstance(comp.levels, AroundTarget) \
                and not 0 <= value <= comp.max_sparsity:
            raise EvosearchError(f"--budget {value:g} is outside this space's range [0, {comp.max_sparsity}] "
                                 f"of average sparsity")
        if isinstance(comp, WidthSpace) and not 0 < value <= 1:  # 0 keeps nothing: every block removed
            raise EvosearchError(f"--budget {value:g} must be a fraction of the searched blocks' parameters kept, "
                                 f"in (0, 1]")

    def materialize(self, arch: Architecture, budget_value: float) -> "SearchProblem":
        self.check_budget(budget_value)
        return self._materialize(arch, budget_value)

    def _materialize(self, arch: Architecture, budget_value: float) -> "SearchProblem":
        if isinstance(self.compression, SparsitySpace):
            return _sparsity_problem(self, self.compression, arch, budget_value)
        if isinstance(self.compression, QuantizationSpace):
            return _quantization_problem(self, self.compression, arch, budget_value)
        if isinstance(self.compression, WidthSpace):
            return _width_problem(self, self.compression, arch, budget_value)
        return _drop_problem(self, self.compression, arch, budget_value)

    def materialize_levels(self, arch: Architecture) -> "SearchProblem":
        """The problem's units and levels where they do not depend on the budget's value (a list of
        levels, or drop), for a budget on another resource (``with_budget``); its own budget is a
        placeholder until then."""
        comp = self.compression
        if isinstance(comp, SparsitySpace) and isinstance(comp.levels, AroundTarget):
            raise EvosearchError(f"space {self.name or 'sparsity'} spaces its levels around a target sparsity, so its "
                                 f"budget must be that sparsity; give a list of levels for a latency or bytes budget")
        placeholder = 0.0  # in the range of every such space's own budget; the levels do not depend on it
        return self._materialize(arch, placeholder)


def ready_spaces() -> list[str]:
    return sorted(p.stem for p in _spaces_dir().glob("*.yaml"))


class SearchProblem:
    """A compression space made concrete for one model and one budget."""

    def __init__(self, spec: CompressionSpace, arch: Architecture, space: Space, budget: Budget,
                 model_units: dict[str, ModelUnit], keys: dict[str, list[str]], starts: list[dict] | None = None):
        self.spec = spec
        self.arch = arch
        self.space = space
        self.budget = budget
        self.model_units = model_units  # unit name -> the model part it stands for
        self.keys = keys  # unit name -> database key per level ("dense", "drop", "zeros=123", "2:4" ...)
        self.starts = starts or []  # assignments a search may start from besides the uniform one

    def key(self, unit: str, level) -> str:
        return self.keys[unit][self.space.unit(unit).levels.index(level)]

    def with_resources(self, resources: dict[str, dict[str, list[float]]]) -> "SearchProblem":
        """The same problem with more resources per unit (``{resource: {unit: one value per level}}``),
        e.g. the latencies of a hardware table; a resource the units already have is replaced."""
        units = [Unit(**unit.model_dump() | {"resources": unit.resources | {
            name: values[unit.name] for name, values in resources.items() if unit.name in values}})
            for unit in self.space.units]
        space = Space(units=units, name=self.space.name, description=self.space.description)
        return SearchProblem(self.spec, self.arch, space, self.budget, self.model_units, self.keys, self.starts)

    def with_budget(self, budget: Budget) -> "SearchProblem":
        starts = [start for start in self.starts if budget.is_met(self.space, start)]
        return SearchProblem(self.spec, self.arch, self.space, budget, self.model_units, self.keys, starts)


def _sparsity_problem(spec: CompressionSpace, comp: SparsitySpace, arch: Architecture, target: float) -> SearchProblem:
    linears = arch.units("linear")
    units, keys = [], {}
    if isinstance(comp.levels, AroundTarget):
        sizes = [u.shape[0] * u.shape[1] for u in linears]
        step_weights = max(1, round(comp.levels.step * sum(sizes) / len(sizes)))
        for u, size in zip(linears, sizes):
            centre = round(target * size)
            offsets = [k for k in range(-comp.levels.steps, comp.levels.steps + 1)
                       if 0 <= centre + k * step_weights <= comp.max_sparsity * size]
            zeros = [centre + k * step_weights for k in offsets]
            # A level is its step from the target (0 = the uniform level), as in EvoPress.
            units.append(Unit(name=u.name, levels=offsets, size=size, group="linear",
                              resources={"sparsity": [z / size for z in zeros], "params": [size - z for z in zeros]}))
            keys[u.name] = ["dense" if z == 0 else f"zeros={z}" for z in zeros]
    else:
        for u in linears:
            size = u.shape[0] * u.shape[1]
            ratios = [_level_sparsity(level) for level in comp.levels]
            units.append(Unit(name=u.name, levels=list(comp.levels), size=size, group=f"{u.shape[0]}x{u.shape[1]}",
                              resources={"sparsity": ratios, "params": [size * (1 - r) for r in ratios]}))
            keys[u.name] = ["dense" if r == 0 else (level if isinstance(level, str) else f"zeros={round(r * size)}")
                            for level, r in zip(comp.levels, ratios)]
    space = Space(units=units, name=spec.name, description=spec.description)
    # Whole weights: a layer's zeros are rounded, so an average is exact to one weight per layer.
    rounding = len(units) / sum(u.size for u in units)
    return SearchProblem(spec, arch, space, _budget(spec.budget, space, target, rounding),
                         {u.name: u for u in linears}, keys)


def _level_sparsity(level: float | str) -> float:
    if isinstance(level, str):
        n, m = map(int, level.split(":"))
        return n / m
    return float(level)


def _drop_problem(spec: CompressionSpace, comp: DropSpace, arch: Architecture, target: float) -> SearchProblem:
    model_units = arch.units(tuple(comp.units))
    units = [Unit(name=u.name, levels=["keep", "drop"], size=u.params, group="drop",
                  resources={"dropped": [0, 1], "params": [u.params, 0]}) for u in model_units]
    space = Space(units=units, name=spec.name, description=spec.description)
    keys = {u.name: ["dense", "drop"] for u in model_units}
    return SearchProblem(spec, arch, space, _budget(spec.budget, space, target), {u.name: u for u in model_units},
                         keys)


def quant_key(zeros: int, bits: int) -> str:
    """Database key of a quantised (and, with zeros > 0, pruned) linear layer."""
    return f"bits={bits}" if zeros == 0 else f"zeros={zeros},bits={bits}"


def parse_quant_key(key: str) -> tuple[int, int]:
    """(zeros, bits) of a ``quant_key``."""
    fields = dict(part.split("=") for part in key.split(","))
    return int(fields.get("zeros", 0)), int(fields["bits"])


def _bitmask_saves(linears, fmt: QuantFormat, sparsity: float) -> bool:
    """Whether the bitmask layout at ``sparsity`` is smaller than the dense one in some layer."""
    shapes = {tuple(u.shape) for u in linears}
    return any(packed_bytes(shape, fmt, shape[0] * shape[1] - round(sparsity * shape[0] * shape[1]))
               < packed_bytes(shape, fmt) for shape in shapes)


def _quantization_problem(spec: CompressionSpace, comp: QuantizationSpace, arch: Architecture,
                          target: float) -> SearchProblem:
    """Levels are bit-widths (``QuantizationSpace``) or (sparsity, bits) pairs (``SparsityQuantSpace``)."""
    linears = arch.units("linear")
    joint = isinstance(comp, SparsityQuantSpace)
    pairs = [(s, b) for s in comp.sparsity for b in comp.bits if s == 0 or _bitmask_saves(linears, comp.format(b), s)] \
        if joint else [(0.0, b) for b in comp.bits]
    if joint:  # most bytes first, in the same order in every layer (costs per weight barely depend on shape)
        shape = linears[0].shape
        pairs.sort(key=lambda p: (-packed_bytes(shape, comp.format(p[1]), round((1 - p[0]) * shape[0] * shape[1])),
                                  p[0]))
    units, keys = [], {}
    for u in linears:
        size = u.shape[0] * u.shape[1]
        zeros = [round(s * size) for s, _ in pairs]
        nbytes = [packed_bytes(u.shape, comp.format(b), size - z if joint else None) for z, (_, b) in zip(zeros, pairs)]
        resources = {"bits": [float(b) for _, b in pairs], "bytes": [float(n) for n in nbytes],
                     "fp16_fraction": [n / (2 * size) for n in nbytes], "params": [float(size - z) for z in zeros]}
        if joint:
            resources["sparsity"] = [z / size for z in zeros]
        levels = [f"{100 * s:g}%@{b}bit" for s, b in pairs] if joint else [b for _, b in pairs]
        units.append(Unit(name=u.name, levels=levels, size=size, group=f"{u.shape[0]}x{u.shape[1]}",
                          resources=resources))
        keys[u.name] = [quant_key(z, b) for z, (_, b) in zip(zeros, pairs)]
    space = Space(units=units, name=spec.name, description=spec.description)
    budget = _budget(spec.budget, space, target)
    (low, high), (lower, upper) = budget.range(space), budget.bounds()
    if low > upper or high < lower:
        raise EvosearchError(f"--budget {target} is out of reach: the {budget.form.split('_')[-1]} "
                             f"{budget.resource} of this space ranges over [{low:.4g}, {high:.4g}]")
    return SearchProblem(spec, arch, space, budget, {u.name: u for u in linears}, keys)


def _width_problem(spec: CompressionSpace, comp: WidthSpace, arch: Architecture, target: float) -> SearchProblem:
    """Per block one unit per kind, its levels the widths in steps; level 0 is the uniform width.

    A level is the number of steps (one KV group, or ``granularity`` channels) by which a
    block is narrower than its uniform width, as EvoPress names sparsity levels by their
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
    from evosearch.subnetwork import layout, unit_parameters

    if (spec.budget.resource, spec.budget.form) != ("kept", "average"):
        raise EvosearchError("a width space's budget is {resource: kept, form: average}: --budget is the fraction "
                             "of the searched blocks' parameters kept")
    model_units = arch.units(tuple(comp.units))
    members = {kind: [u for u in model_units if u.kind == kind] for kind in comp.units}
    kinds = {}  # kind -> (step in groups, steps in a full block, fewest steps allowed)
    for kind in comp.units:
        groups = layout(arch, members[kind][0]).groups
        step = 1 if kind == "attention" else comp.granularity
        if groups % step:
            raise EvosearchError(f"granularity {step} does not divide the MLP's {groups} channels; choose a divisor "
                                 f"of {groups}")
        full = groups // step
        kinds[kind] = (step, full, min(full, math.ceil(comp.min_keep * full - 1e-9)))
    params = {u.name: [unit_parameters(arch, u, k * kinds[u.kind][0]) for k in range(kinds[u.kind][1] + 1)]
              for u in model_units}
    dense = sum(p[-1] for p in params.values())
    lowest = sum(params[u.name][kinds[u.kind][2]] for u in model_units) / dense
    if not lowest <= target <= 1:
        raise EvosearchError(f"--budget {target} is outside this space's range [{lowest:.3f}, 1] of the fraction "
                             f"of parameters kept (min_keep {comp.min_keep})")

    def uniform(first: float) -> dict[str, int]:
        """Steps kept per unit: the first kind keeps the fraction ``first`` of its steps, the last fills the budget."""
        keep = {}
        for i, kind in enumerate(comp.units):
            _, full, low = kinds[kind]
            n = len(members[kind])
            if i + 1 < len(comp.units):
                totals = [min(max(round(first * full * n), low * n), full * n)]
            else:
                totals = range(low * n, full * n + 1)
            rest = target * dense - sum(params[name][k] for name, k in keep.items())
            spreads = [_spread(total, n) for total in totals]
            best = min(spreads, key=lambda ks: abs(sum(params[u.name][k] for u, k in zip(members[kind], ks)) - rest))
            keep |= {u.name: k for u, k in zip(members[kind], best)}
        return keep

    last = comp.units[-1]
    rounding = (params[members[last][0].name][-1] - params[members[last][0].name][-2]) / 2 / dense * (1 + 1e-6)
    centre = uniform(target)
    units, keys = [], {}
    for u in model_units:
        step, full, low = kinds[u.kind]
        keeps = list(range(full, low - 1, -1))  # widest first: levels go from least to most compressed
        units.append(Unit(name=u.name, levels=[centre[u.name] - k for k in keeps], size=params[u.name][-1],
                          group=u.kind, resources={"kept": [params[u.name][k] / params[u.name][-1] for k in keeps],
                                                   "params": [float(params[u.name][k]) for k in keeps]}))
        noun = "kv_heads" if u.kind == "attention" else "channels"
        keys[u.name] = ["dense" if k == full else "drop" if k == 0 else f"{noun}={k * step}" for k in keeps]
    space = Space(units=units, name=spec.name, description=spec.description)
    budget = _budget(spec.budget, space, target, rounding)
    starts = []
    if len(comp.units) > 1:
        spread = (1 - target) / 2
        for first in sorted({max(0.0, target - spread), target, target + spread, 1.0}):
            keep = uniform(first)
            start = {u.name: centre[u.name] - keep[u.name] for u in model_units}
            if budget.is_met(space, start) and start not in starts:
                starts.append(start)
    return SearchProblem(spec, arch, space, budget, {u.name: u for u in model_units}, keys, starts)


def _spread(total: int, count: int) -> list[int]:
    """``total`` split into ``count`` whole numbers that differ by at most one, the larger ones spread evenly."""
    base, extra = divmod(total, count)
    return [base + ((i + 1) * extra // count - i * extra // count) for i in range(count)]


def _budget(spec: BudgetSpec, space: Space, value: float, rounding: float = 0.0) -> Budget:
    if spec.form == "fraction_of_units":
        units = len(space.units)
        total = round(value * units)
        if units and total >= units:  # CompressionSpace.check_budget has refused values from 1 on
            raise EvosearchError(f"--budget {value:g} rounds to all {units} units; at most {(units - 1) / units:.4g} "
                                 f"keeps one")
        return Budget(resource=spec.resource, total=total)
    if spec.form == "average":
        return Budget(resource=spec.resource, average=value, tolerance=max(rounding, spec.tolerance))
    if spec.form == "max_average":
        return Budget(resource=spec.resource, max_average=value)
    return Budget(resource=spec.resource, max_total=value)
