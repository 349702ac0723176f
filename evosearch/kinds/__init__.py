"""Compression kinds: one module each, behind one protocol (``evosearch.kinds.base.Compression``).

``KINDS`` maps a space's ``kind:`` to its class. The built-in kinds register themselves
below; your own is one call, ``register(YourKind)``, after which spaces (YAML or Python)
name it like any other. Typed levels are read back from ``result.json`` and hardware
tables through the level types the registered kinds declare (``level_from_json``,
``level_from_name``).
"""

from __future__ import annotations

from typing import Any

from evosearch.errors import EvosearchError
from evosearch.kinds.base import Compression, Dense, Drop, Keep, Level
from evosearch.kinds.drop import DropSpace
from evosearch.kinds.nm import NM, NMSpace
from evosearch.kinds.quantization import Quant, QuantizationSpace, SparsityQuantSpace
from evosearch.kinds.sparsity import AroundTarget, Sparse, SparsitySpace
from evosearch.kinds.width import Width, WidthSpace

KINDS: dict[str, type[Compression]] = {}


def register(kind: type[Compression]) -> type[Compression]:
    """Make a compression kind available to spaces by its ``kind`` name (usable as a class decorator)."""
    name = kind.model_fields["kind"].default
    if not isinstance(name, str) or not name:
        raise TypeError(f"{kind.__name__}.kind needs a default: the name spaces use, e.g. kind: Literal['x'] = 'x'")
    KINDS[name] = kind
    return kind


for _kind in (SparsitySpace, NMSpace, QuantizationSpace, SparsityQuantSpace, DropSpace, WidthSpace):
    register(_kind)


def parse_kind(data: Any) -> Compression:
    """The kind a ``compression:`` mapping names, validated by that kind's own fields."""
    if isinstance(data, Compression):
        return data
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError(f"give the compression's kind, one of {', '.join(sorted(KINDS))}")
    if data["kind"] not in KINDS:
        raise ValueError(f"kind {data['kind']!r} is not known; known kinds: {', '.join(sorted(KINDS))} "
                         f"(register your own with evosearch.kinds.register)")
    return KINDS[data["kind"]].model_validate(data)


def level_types() -> dict[str, type[Level]]:
    """Every level type the registered kinds make, by its ``type`` tag."""
    return {t.type: t for kind in KINDS.values() for t in kind.levels_types}


def level_from_json(data: dict) -> Level:
    """A level as ``Level.to_json`` wrote it."""
    fields = dict(data)
    types = level_types()
    if fields.get("type") not in types:
        raise EvosearchError(f"level {data!r}: type is not one of {', '.join(sorted(types))}")
    return types[fields.pop("type")].model_validate(fields)


def level_from_name(name: str) -> Level:
    """The level a full name spells (``dense``, ``zeros=512``, ``2:4``, ``bits=4,group=64,sym``, ``kv_heads=2``)."""
    for level_type in level_types().values():
        level = level_type.from_name(name)
        if level is not None:
            return level
    raise EvosearchError(f"{name!r} is not a level name; levels are named like dense, drop, zeros=N, 2:4, "
                         f"bits=4, bits=4,group=64,sym, kv_heads=K, channels=C")


__all__ = ["KINDS", "register", "parse_kind", "level_from_json", "level_from_name", "Compression", "Level", "Keep",
           "Dense", "Drop", "Sparse", "NM", "Quant", "Width", "SparsitySpace", "NMSpace", "QuantizationSpace",
           "SparsityQuantSpace", "DropSpace", "WidthSpace", "AroundTarget"]
