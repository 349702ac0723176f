"""An assignment as a grid of unit types x layers, valued by a resource: what ``show`` prints and
``report`` draws (``evosearch.plots``).

The grid needs to know no space: rows and columns come from the unit names (the first
all-digit part of ``model.layers.7.self_attn.q_proj`` is the layer, the rest the row), and
each cell's value is the budget's resource (sparsity, bits, dropped...) at the unit's level,
read from the space the run wrote for its model (``space.yaml``). Levels named by strings
(``keep``/``drop``, ``2:4``) are shown by name.
"""

from __future__ import annotations

from evosearch.space import Space

RESOURCE_LABELS = {  # colour-bar and column labels of resources the ready spaces use
    "sparsity": "sparsity (fraction of weights zero)",
    "dropped": "dropped (1) or kept (0)",
    "bits": "bits per weight",
    "params": "parameters kept",
}


def unit_position(name: str) -> tuple[int | None, str]:
    """(layer, row) of a unit name: ``model.layers.7.mlp.up_proj`` is (7, "mlp.up_proj")."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1 :]) or "block"
    return None, name


def allocation(assignment: dict, space: Space | None, resource: str | None) -> dict:
    """The assignment as a grid: rows are unit types, columns layers, cells the resource at the unit's level.

    Without the space (no space.yaml), numeric levels stand for themselves. Units with no
    layer number in their name are listed under ``other``.
    """
    units = {u.name: u for u in space.units} if space else {}
    rows: list[str] = []
    layers: set[int] = set()
    cells: dict[tuple[str, int], tuple[float | None, str, float]] = {}
    other = {}
    for name, level in assignment.items():
        value = _value(units.get(name), level, resource)
        if isinstance(level, str) or value is None:
            label = str(level)
        else:
            label = number(value)
        size = units[name].size if name in units else 1.0
        layer, row = unit_position(name)
        if layer is None:
            other[name] = label
            continue
        if row not in rows:
            rows.append(row)
        layers.add(layer)
        cells[row, layer] = (value, label, size)
    layers_sorted = sorted(layers)
    values = [[cells.get((r, l), (None,))[0] for l in layers_sorted] for r in rows]
    labels = [[cells[r, l][1] if (r, l) in cells else None for l in layers_sorted] for r in rows]
    means = []
    for l in layers_sorted:
        present = [cells[r, l] for r in rows if (r, l) in cells and cells[r, l][0] is not None]
        weight = sum(c[2] for c in present)
        means.append(sum(c[0] * c[2] for c in present) / weight if present else None)
    used_resource = resource if any(resource in u.resources for u in units.values()) else "level"
    return {"resource": used_resource, "rows": rows, "layers": layers_sorted, "values": values, "labels": labels,
            "layer_mean": means, "other": other}


def _value(unit, level, resource: str | None) -> float | None:
    if unit is not None and resource in unit.resources and level in unit.levels:
        return float(unit.resources[resource][unit.levels.index(level)])
    if isinstance(level, (int, float)) and not isinstance(level, bool):
        return float(level)
    return None


def number(value: float) -> str:
    """A resource value as a short label: 4, 0.53."""
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


