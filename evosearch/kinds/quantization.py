"""Bit-widths per linear layer (GPTQ or round-to-nearest), and (sparsity, bit-width) pairs.

A level is ``Quant(bits, group_size, symmetric, zeros)``: the layer quantised in that format
and, with ``zeros`` > 0, pruned first (that many weights) and quantised with the mask kept,
so its zeros stay zero. The format is part of the level: a hardware table times
``bits=4,group=64,sym``, not "4 bits". The database stores dequantised weights (the search
swaps them in like any other level); export recovers the exact codes from them
(``recover_grid``) and packs them (``evosearch.layouts``), and a level costs the bytes that
packing writes.

``QuantizationSpace`` (kind ``quantization``) gives every layer the same bit-widths; layers
are grouped by shape, so an EvoPress level switch trades a bit between two layers of equal
size and keeps the average bit-width exactly (with equally spaced ``bits``).
``SparsityQuantSpace`` (kind ``sparsity-quant``) gives (sparsity, bits) pairs, ordered by
bytes.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

from evosearch.database.quantization import GPTQ, QuantFormat, distinct_per_group, recover_grid, rtn_quantize
from evosearch.database.sparsity import SparseGPT, magnitude_prune, wanda_prune
from evosearch.kinds.base import Compression, Keep, Level
from evosearch.layouts import bitmask_saves, linear_bytes, packed_bytes
from evosearch.problem import SearchProblem, check_reach, make_budget
from evosearch.space import Space, Unit

log = logging.getLogger("evosearch")

FORMAT_NAME = re.compile(r"^(?:zeros=(\d+),)?bits=(\d+)(?:,group=(\d+|row))?(,sym)?$")
DEFAULT_GROUP = 128  # a name without ",group=" means groups of 128 (the names of earlier versions)


class Quant(Level):
    """The layer quantised to ``bits`` in groups of ``group_size`` input columns (None: one group per
    row) on a symmetric or asymmetric grid; pruned first when ``zeros`` > 0."""

    type: ClassVar[str] = "quant"
    name_pattern: ClassVar[re.Pattern] = FORMAT_NAME
    bits: int = Field(ge=2, le=8)
    group_size: int | None = DEFAULT_GROUP
    symmetric: bool = False
    zeros: int = Field(0, ge=0)

    @property
    def fmt(self) -> QuantFormat:
        return QuantFormat(self.bits, self.group_size, self.symmetric)

    @property
    def key(self) -> str:
        # The database's identity holds the format, so entries are named by what varies within one.
        return f"bits={self.bits}" if self.zeros == 0 else f"zeros={self.zeros},bits={self.bits}"

    @property
    def name(self) -> str:
        group = "" if self.group_size == DEFAULT_GROUP else f",group={self.group_size or 'row'}"
        zeros = f"zeros={self.zeros}," if self.zeros else ""
        return f"{zeros}bits={self.bits}{group}{',sym' if self.symmetric else ''}"

    @classmethod
    def from_name(cls, name: str) -> Level | None:
        match = FORMAT_NAME.match(str(name))
        if not match or not 2 <= int(match[2]) <= 8:
            return None
        group = match[3]
        return cls(bits=int(match[2]), group_size=None if group == "row" else int(group) if group else DEFAULT_GROUP,
                   symmetric=bool(match[4]), zeros=int(match[1] or 0))

    @classmethod
    def of(cls, fmt: QuantFormat, zeros: int = 0) -> Quant:
        return cls(bits=fmt.bits, group_size=fmt.group_size, symmetric=fmt.symmetric, zeros=zeros)

    def packed(self) -> Quant:
        """What runs: a pruned level is unpacked to the dense packed layout on loading."""
        return self.model_copy(update={"zeros": 0})

    def applies_to(self, unit) -> bool:
        return unit.kind == "linear"

    def runtime_module(self, arch, unit, device):
        return packed_module(arch.module(unit.name), self.fmt, device)

    def bytes(self, arch, unit) -> int:
        size = arch.module(unit.name).weight.numel()
        return linear_bytes(arch, unit.name, self.fmt, size - self.zeros if self.zeros else None)


class QuantizationSpace(Compression):
    """A bit-width per linear layer, every level built by GPTQ (or round-to-nearest) in one format.

    The database identity holds the format, so another group size, grid or method never
    reuses entries.
    """

    kind: Literal["quantization"] = "quantization"
    method: Literal["rtn", "gptq"] = "gptq"
    units: Literal["linear"] = "linear"
    bits: list[int] = [2, 3, 4, 5, 6]
    group_size: int | None = Field(DEFAULT_GROUP, ge=1, description="input columns per scale; null = one group per row")
    symmetric: bool = False
    act_order: bool = Field(False, description="GPTQ: quantise the inputs with the largest Hessian diagonal first")
    levels_types: ClassVar = (Quant,)
    joint: ClassVar[bool] = False  # levels are (sparsity, bits) pairs, costed in the smaller layout

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, bits):
        if not bits or len(set(bits)) != len(bits) or not all(2 <= b <= 8 for b in bits):
            raise ValueError(f"bits must be distinct bit-widths from 2 to 8, like [2, 3, 4], got {bits}")
        return sorted(bits, reverse=True)  # least compressed first

    def format(self, bits: int) -> QuantFormat:
        return QuantFormat(bits, self.group_size, self.symmetric)

    def database_identity(self) -> dict:
        # Entries are named by bits and zeros; everything else they depend on is here.
        return super().database_identity() | {"format": self.model_dump(exclude={"kind", "units", "bits", "sparsity"})}

    # --- the problem
    def pairs(self, linears) -> list[tuple[float, int]]:
        """The (sparsity, bits) of each level, least compressed first."""
        return [(0.0, b) for b in self.bits]

    def label(self, sparsity: float, bits: int):
        return bits

    def problem(self, space, arch, target):
        linears = arch.units("linear")
        pairs, joint = self.pairs(linears), self.joint
        units, levels = [], {}
        for u in linears:
            size = u.shape[0] * u.shape[1]
            zeros = [round(s * size) for s, _ in pairs]
            nbytes = [packed_bytes(u.shape, self.format(b), size - z if joint else None)
                      for z, (_, b) in zip(zeros, pairs)]
            resources = {"bits": [float(b) for _, b in pairs], "bytes": [float(n) for n in nbytes],
                         "fp16_fraction": [n / (2 * size) for n in nbytes], "params": [float(size - z) for z in zeros]}
            if joint:
                resources["sparsity"] = [z / size for z in zeros]
            units.append(Unit(name=u.name, levels=[self.label(s, b) for s, b in pairs], size=size,
                              group=f"{u.shape[0]}x{u.shape[1]}", resources=resources))
            levels[u.name] = [Quant.of(self.format(b), z) for z, (_, b) in zip(zeros, pairs)]
        searched = Space(units=units, name=space.name, description=space.description)
        budget = make_budget(space.budget, searched, 0.0 if target is None else target)
        if target is not None:
            check_reach(budget, searched, target)
        return SearchProblem(space, arch, searched, budget, {u.name: u for u in linears}, levels)

    # --- the database
    def build(self, arch, unit, hessians, missing, levels, database):
        """Every missing level of one linear layer: pruned first (joint levels), then quantised at
        each bit-width, with the pruned weights kept at zero; GPTQ sweeps all bit-widths at once."""
        hessian = hessians[unit.name]
        weight = arch.module(unit.name).weight
        by_key = {level.key: level for level in levels}
        by_zeros = defaultdict(list)
        for key in missing:
            by_zeros[by_key[key].zeros].append(by_key[key])
        pruned = {0: weight}
        if sparse := sorted(by_zeros.keys() - {0}):
            pruned |= self._prune(weight, hessian, sparse)
        for zeros, wanted in by_zeros.items():
            W = pruned[zeros]
            keep = W != 0 if zeros else None  # the pruning mask
            fmts = [level.fmt for level in wanted]
            if self.method == "gptq":  # every bit-width in one sweep
                quantized = GPTQ(W, hessian.H, act_order=self.act_order).quantize_many(fmts, keep)
            else:  # round-to-nearest maps a zero to the zero point, so it keeps zeros with no mask
                quantized = [rtn_quantize(W, fmt) for fmt in fmts]
            for level, q in zip(wanted, quantized):
                database.put(unit.name, level.key, {f"{unit.name}.weight": q.dequantize()})

    def _prune(self, weight: torch.Tensor, hessian, zeros: list[int]) -> dict[int, torch.Tensor]:
        raise NotImplementedError("a quantization space has no pruned levels")

    # --- resources
    def latency_class(self, level):
        return level.packed() if isinstance(level, Quant) else level

    def measure(self, arch, problem, levels):
        """Average bits, packed bytes, their fraction of float16 and the non-zero weights of the
        searched layers in the formats ``levels`` name, checked against the weights.

        A layer's bit-width is taken from its level and verified: every group of its weights
        must hold at most 2^bits distinct values. Zeros are counted from the weights, so a joint
        level's bytes are those of the weights as they are, which is the bitmask export writes
        (rounding may zero a few more than pruning did, so this is at most the level's count;
        the quantisation-only spaces store every weight).
        """
        joint = self.joint
        weights = bits = nbytes = nonzeros = 0
        for unit in problem.model_units:
            W, fmt = arch.module(unit).weight, levels[unit].fmt
            most = int(distinct_per_group(W, fmt.group_size).max())
            if most > 2**fmt.bits:
                raise RuntimeError(f"{unit} holds {most} distinct values in one group: not the applied {fmt.bits}-bit format")
            count = int(torch.count_nonzero(W))
            weights += W.numel()
            bits += fmt.bits * W.numel()
            nbytes += packed_bytes(tuple(W.shape), fmt, count if joint else None)
            nonzeros += count if joint else W.numel()
        usage = {"bits": bits / weights, "bytes": float(nbytes), "fp16_fraction": nbytes / (2 * weights),
                 "params": float(nonzeros)}
        if joint:
            usage["sparsity"] = 1 - nonzeros / weights
        return usage

    def record(self, arch, problem, levels, measured):
        """``quantization`` (what ``measure`` counts) and ``formats``: each layer's format and pruned
        zeros, as healing reads them (it keeps every layer on its grid and its zeros at zero)."""
        formats = {unit: {"bits": level.bits, "group_size": level.group_size, "symmetric": level.symmetric,
                          "zeros": level.zeros} for unit, level in levels.items()}
        return {"quantization": measured, "formats": formats}

    # --- export and healing
    def export(self, job):
        """Quantised layers hold their dequantised values; the exact codes are recovered from the
        format's grid, so ``--format packed`` stores integer codes, scales and zero points. A layer
        whose weights are off the grid (changed after the search) stays dense rather than be re-rounded.
        A pruned layer whose non-zeros make the bitmask layout smaller gets it."""
        for unit, level in job.levels.items():
            weight = job.arch.module(unit).weight
            grid, exact = recover_grid(weight, level.fmt)
            if not exact.all():
                log.warning("%s: %d of %d weight groups are off its %d-bit grid; it is written dense", unit,
                            int((~exact).sum()), exact.numel(), level.bits)
                continue
            job.quantized[unit] = grid
            # The non-zeros, not the pruning mask: the stored weights cannot tell a kept weight at its
            # zero point from a pruned one (export's docstring); on the grid, W != 0 iff code != zero.
            keep = weight != 0
            if level.zeros and bitmask_saves(tuple(weight.shape), grid.fmt, int(keep.sum())):
                job.bitmask[unit] = keep.cpu()

    def keep(self, arch, unit, level):
        # A zero of a quantised layer is a code like any other, unless the layer was pruned.
        return Keep(zeros={unit.name} if level.zeros else set(), formats={unit.name: (level.fmt, level.zeros > 0)})


class SparsityQuantSpace(QuantizationSpace):
    """Joint levels: a (sparsity, bit-width) pair per linear layer, pruned then quantised.

    Each layer is pruned (SparseGPT by default) to every sparsity, then each pruned
    weight is quantised to every bit-width with its zeros kept: GPTQ runs with the
    pruning mask fixed (see ``GPTQ``), and round-to-nearest keeps zeros because 0 is
    on every grid. A level's cost is the bytes ``--format packed`` writes for it
    (``layouts.packed_bytes``): the smaller of the dense layout and the bitmask layout. A
    (sparsity, bits) pair whose bitmask layout is no smaller than the dense one in any
    layer is left out (roughly sparsity x bits <= 1: the mask's bit per weight pays for
    nothing), since the denser level at the same bit-width costs the same. Levels are
    named like ``50%@4bit`` and ordered by bytes, most first.
    """

    kind: Literal["sparsity-quant"] = "sparsity-quant"
    joint: ClassVar[bool] = True
    pruning: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    sparsity: list[float] = [0.0, 0.25, 0.5]

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, sparsity):
        if not sparsity or len(set(sparsity)) != len(sparsity) or not all(0 <= s < 1 for s in sparsity):
            raise ValueError(f"sparsity must be distinct fractions in [0, 1), like [0.0, 0.5], got {sparsity}")
        return sorted(sparsity)

    def pairs(self, linears):
        shapes = {tuple(u.shape) for u in linears}
        pairs = [(s, b) for s in self.sparsity for b in self.bits
                 if s == 0 or any(bitmask_saves(shape, self.format(b), shape[0] * shape[1]
                                                - round(s * shape[0] * shape[1])) for shape in shapes)]
        # Most bytes first, in the same order in every layer (costs per weight barely depend on shape).
        shape = linears[0].shape
        pairs.sort(key=lambda p: (-packed_bytes(shape, self.format(p[1]), round((1 - p[0]) * shape[0] * shape[1])),
                                  p[0]))
        return pairs

    def label(self, sparsity: float, bits: int):
        return f"{100 * sparsity:g}%@{bits}bit"

    def _prune(self, weight, hessian, zeros):
        """The layer pruned to each number of zeros, by the space's pruning method."""
        sparsities = [z / weight.numel() for z in zeros]
        if self.pruning == "sparsegpt":
            pruned = SparseGPT(weight, hessian.H).prune_levels(sparsities)
        elif self.pruning == "wanda":
            pruned = [wanda_prune(weight, hessian.column_norms(), s) for s in sparsities]
        else:
            pruned = [magnitude_prune(weight, s) for s in sparsities]
        return dict(zip(zeros, pruned))


def packed_module(layer: torch.nn.Linear, fmt: QuantFormat, device: torch.device):
    """``layer`` quantised to ``fmt`` (round-to-nearest) as the packed layer an export loads (for timing)."""
    from evosearch.layouts import pack_quantized
    from evosearch.runtime import PackedLinear

    qw = rtn_quantize(layer.weight, fmt)
    packed = PackedLinear(layer.in_features, layer.out_features, fmt, layer.bias is not None)
    packed.load_state_dict(pack_quantized(qw) | ({"bias": layer.bias} if layer.bias is not None else {}))
    packed.unpack_zeros()
    return packed.to(device)
