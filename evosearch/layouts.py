"""Every on-disk layout of a weight, and its byte count (one count: budgets, reports and export agree).

Dense
-----
A tensor in the model's dtype. Dense, unstructured and N:M sparse weights are stored this
way (``dense_bytes``); a dropped sub-block or block takes its norms with it.

Pack-quantized (compressed-tensors' ``pack-quantized``)
-------------------------------------------------------
A quantised linear layer ``L`` stores, instead of ``L.weight``:

    L.weight_packed      int32 (out, ceil(in * bits / 32))   codes, bit stream per row (kernels/quant.py)
    L.weight_scale       float32 (out, groups)                scale per row and group of input columns
    L.weight_zero_point  int32 (ceil(out * bits / 32), groups) zero codes, packed the same way along the
                                                              output dimension (asymmetric formats only)
    L.weight_shape       int64 (2,)                           [out, in]

with ``W[r, c] = scale[r, c // group_size] * (code[r, c] - zero[r, c // group_size])``; a
symmetric format has no zero points (zero = 2^(bits-1)). Scales stay float32, so the
loaded layer computes exactly the weights the search evaluated.

Bitmask (evosearch's own)
-------------------------
A quantised layer with zeros (pruned, then quantised with the mask kept) may instead store

    L.weight_mask        uint8 (out, ceil(in / 8))           bit c % 8 of byte c // 8 of row r set where
                                                              W[r, c] is kept
    L.weight_packed      int32 (ceil(kept * bits / 32),)      the kept weights' codes in row-major order,
                                                              one bit stream (``pack`` on a single row)

plus the same ``weight_scale``, ``weight_zero_point`` and ``weight_shape``; a cleared bit
is a zero weight (code = zero point). A weight with zeros is stored in whichever of the
two is smaller (the dense one on a tie, since compressed-tensors reads only that).

Byte counts (``packed_bytes``): the codes as int32 words, ``bits`` each, a bit stream per
row (``4 * rows * ceil(cols * bits / 32)`` bytes) or, in the bitmask layout, the mask
(``rows * ceil(cols / 8)``) and the kept codes as one stream (``4 * ceil(nonzeros * bits /
32)``); per row and group one float32 scale (``4 * rows * groups``); for the asymmetric
grid only, the zero points as int32 words packed along the rows (``4 * ceil(rows * bits /
32) * groups``); and the int64 shape (16 bytes).

``evosearch.runtime`` loads these layouts back into modules that run them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from evosearch.database.quantization import QuantFormat, QuantizedWeight
from evosearch.kernels import quant as qkernel

if TYPE_CHECKING:
    from evosearch.units import Architecture, ModelUnit

SCALE_BYTES = 4  # float32 scales: the exported layer computes exactly what the search evaluated
SHAPE_BYTES = 16  # the int64 [out, in] stored with every packed weight


# --- byte counts -----------------------------------------------------------------------------------

def packed_bytes(shape: tuple[int, int], fmt: QuantFormat, nonzeros: int | None = None) -> int:
    """Bytes of the tensors export writes for a (rows, cols) weight in ``fmt``: the pack-quantized
    layout, or with ``nonzeros`` (the weights the bitmask keeps) given, the smaller of it and the
    bitmask layout (see the module docstring)."""
    rows, cols = shape
    groups = fmt.groups(cols)

    def int32_words(codes: int) -> int:
        return math.ceil(codes * fmt.bits / 32)

    grids = SCALE_BYTES * rows * groups + (0 if fmt.symmetric else 4 * int32_words(rows) * groups) + SHAPE_BYTES
    dense = 4 * rows * int32_words(cols)
    if nonzeros is None:
        return dense + grids
    bitmask = rows * math.ceil(cols / 8) + 4 * int32_words(nonzeros)
    return min(dense, bitmask) + grids


def bitmask_saves(shape: tuple[int, int], fmt: QuantFormat, nonzeros: int) -> bool:
    """Whether the bitmask layout of a weight with ``nonzeros`` kept is smaller than pack-quantized."""
    return packed_bytes(shape, fmt, nonzeros) < packed_bytes(shape, fmt)


def dense_bytes(arch: Architecture, unit: ModelUnit) -> int:
    """Bytes of a unit stored dense: its linear layers' weights and biases in their dtype, and for a
    sub-block or block the other parameters that go with it (its norms)."""
    linear = sum(p.numel() * p.element_size() for name in unit.linears for p in arch.module(name).parameters())
    return linear + sum(p.numel() * p.element_size() for p in arch.other_parameters(unit))


def linear_bytes(arch: Architecture, name: str, fmt: QuantFormat | None, nonzeros: int | None = None) -> int:
    """Bytes of one linear layer: dense, or packed in ``fmt`` (``nonzeros``: see ``packed_bytes``); biases dense."""
    layer = arch.module(name)
    weight = layer.weight
    total = weight.numel() * weight.element_size() if fmt is None else packed_bytes(tuple(weight.shape), fmt,
                                                                                      nonzeros)
    if layer.bias is not None:
        total += layer.bias.numel() * layer.bias.element_size()
    return total


# --- packing -----------------------------------------------------------------------------------------

def pack_quantized(qw: QuantizedWeight, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one packed layer (without the layer's name); with ``keep`` (bool, the
    codes' shape) in the bitmask layout, where every weight outside ``keep`` must be zero."""
    out, columns = qw.codes.shape
    if keep is None:
        codes = qkernel.pack(qw.codes.cpu(), qw.fmt.bits)
    else:
        codes = qkernel.pack(qw.codes.cpu()[keep.cpu()][None, :], qw.fmt.bits)[0]  # row-major, one stream
    tensors = {"weight_packed": codes,
               "weight_scale": qw.scales.detach().to("cpu", torch.float32).contiguous(),
               "weight_shape": torch.tensor([out, columns], dtype=torch.int64)}
    if not qw.fmt.symmetric:
        tensors["weight_zero_point"] = qkernel.pack(qw.zeros.cpu().T.contiguous(), qw.fmt.bits).T.contiguous()
    if keep is not None:
        tensors["weight_mask"] = pack_mask(keep.cpu())
    return tensors


MASK_BITS = torch.arange(8)  # bit c % 8 of a mask byte is column c


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """uint8 (rows, ceil(columns / 8)): bit c % 8 of byte c // 8 set where ``keep[r, c]``."""
    rows, columns = keep.shape
    padded = torch.nn.functional.pad(keep.to(torch.int32), (0, -columns % 8))
    return (padded.reshape(rows, -1, 8) << MASK_BITS.to(torch.int32)).sum(dim=2).to(torch.uint8)


def unpack_mask(mask: torch.Tensor, columns: int) -> torch.Tensor:
    """The bool (rows, columns) that ``pack_mask`` packed."""
    bits = (mask.to(torch.int32)[:, :, None] >> MASK_BITS.to(torch.int32)) & 1
    return bits.reshape(mask.shape[0], -1)[:, :columns].bool()


def expand_bitmask(tensors: dict[str, torch.Tensor], fmt: QuantFormat) -> torch.Tensor:
    """Dense ``weight_packed`` (out, words) of a bitmask layer's tensors (names without the layer's):
    the kept codes in place and the zero point wherever the mask is clear (a zero weight)."""
    out, columns = tensors["weight_shape"].tolist()
    keep = unpack_mask(tensors["weight_mask"], columns)
    if fmt.symmetric:
        zeros = torch.full((out, fmt.groups(columns)), fmt.symmetric_zero, dtype=torch.int64)
    else:
        zeros = qkernel.unpack(tensors["weight_zero_point"].T.contiguous(), fmt.bits, out).T
    codes = zeros[:, fmt.group_index(columns)].clone()
    kept = int(keep.sum())
    codes[keep] = qkernel.unpack(tensors["weight_packed"][None, :], fmt.bits, kept)[0].to(codes.dtype)
    return qkernel.pack(codes, fmt.bits)


def compressed_tensors_config(packed: dict[str, QuantFormat], ignore: list[str]) -> dict:
    """A ``quantization_config`` for config.json: one config group per format, layers named exactly."""
    formats = sorted(set(packed.values()), key=lambda f: (f.bits, f.group_size or 0, f.symmetric))
    groups = {}
    for i, fmt in enumerate(formats):
        groups[f"group_{i}"] = {
            "targets": sorted(name for name, f in packed.items() if f == fmt),
            "weights": {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric,
                        "strategy": "channel" if fmt.group_size is None else "group", "group_size": fmt.group_size,
                        "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
                        "block_structure": None},
            "input_activations": None, "output_activations": None, "format": "pack-quantized",
        }
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": sorted(ignore), "kv_cache_scheme": None,
            "global_compression_ratio": None}
