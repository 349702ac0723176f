"""Export: a searched assignment made real on disk, and loaded back.

During the search a compressed model is the dense model with weights swapped in place:
a dropped block has a zero output projection, a 2:4 layer holds zeros, a quantised layer
holds its dequantised values. Export turns that into a model that is smaller or faster:

- dropped decoder blocks are removed (``num_hidden_layers``, per-layer config lists and the
  blocks' numbering follow, so KV-cache indices stay consistent);
- dropped attention or MLP sub-blocks, and heads or channels sliced away by a width
  search, make the blocks unlike each other; the config then names evosearch's small
  modeling file, saved beside the weights (``modeling_evosearch.py``, ``auto_map``), with
  one entry of overrides per block in ``evosearch_layers``;
- quantised linear layers are packed (``--format packed``): their exact integer codes,
  scales and zero points, in compressed-tensors' pack-quantized layout (below);
- 2:4 sparse layers are listed in ``evosearch.json``; ``load_exported`` turns them into
  PyTorch semi-structured sparse tensors on a GPU that runs them (compute capability 8.0
  or newer), and keeps them dense elsewhere;
- beside the weights: the tokenizer, the generation config and ``evosearch.json`` (the
  assignment, the search settings, what was removed, packed or flagged, and the bytes).

Formats
-------
``hf``: every weight a dense tensor (quantised layers dequantised). Loads with
``AutoModelForCausalLM.from_pretrained(folder)``, with ``trust_remote_code=True`` when
blocks differ (config ``model_type: evosearch_llama``).

``packed``: as ``hf``, except that each quantised linear layer ``L`` stores, instead of
``L.weight``:

    L.weight_packed      int32 (out, ceil(in * bits / 32))   codes, bit stream per row (kernels/quant.py)
    L.weight_scale       float32 (out, groups)                scale per row and group of input columns
    L.weight_zero_point  int32 (ceil(out * bits / 32), groups) zero codes, packed the same way along the
                                                              output dimension (asymmetric formats only)
    L.weight_shape       int64 (2,)                           [out, in]

with ``W[r, c] = scale[r, c // group_size] * (code[r, c] - zero[r, c // group_size])``; a
symmetric format has no zero points (zero = 2^(bits-1)). Scales stay float32, so the
loaded layer computes exactly the weights the search evaluated. ``config.json`` carries a
compressed-tensors ``quantization_config`` (``quant_method: compressed-tensors``,
``format: pack-quantized``, one config group per format whose ``targets`` are the layer
names, every other linear layer in ``ignore``). This is compressed-tensors' own packing for
every bit-width 1..8, so ``from_pretrained`` with the ``compressed-tensors`` package
installed loads any of them (as dense weights); vLLM's int4/int8 weight-only kernels serve
4- and 8-bit layers with a group size of 32, 64, 128 or a whole row, when q/k/v and
gate/up share a format and the blocks are plain Llama blocks; ``evosearch.json`` says
whether that holds (``vllm``). ``load_exported(folder)`` keeps the codes packed and
multiplies through the dequantising kernel in ``kernels/quant.py``.

Bitmask layout (evosearch's own): a layer of the ``sparsity-quant`` space with zeros is
written this way instead when it is smaller (``database.quantization.packed_bytes``
counts both layouts, and the space's budget is that count):

    L.weight_mask        uint8 (out, ceil(in / 8))           bit c % 8 of byte c // 8 of row r set where
                                                              W[r, c] is kept
    L.weight_packed      int32 (ceil(kept * bits / 32),)      the kept weights' codes in row-major order,
                                                              one bit stream (``pack`` on a single row)

plus the same ``weight_scale``, ``weight_zero_point`` and ``weight_shape``; a cleared bit
is a zero weight (code = zero point). The mask export writes is the layer's non-zero
weights: the database stores dequantised weights, in which a kept weight that rounded to
its zero point is 0 like a pruned one, so the pruning mask itself cannot be told apart;
the mask written keeps at most the level's weights, so the space's count is an upper
bound and the bytes the search reports (which count the non-zeros) are exact.
``evosearch.json`` lists these layers under ``bitmask``; compressed-tensors cannot read
them, so they are in the config's ``ignore`` (not its targets) and make ``vllm``
unservable. Such an export's weights are written as ``evosearch-bitmask.safetensors``,
so that ``from_pretrained`` stops with "no file named model.safetensors" rather than load
the model with those layers missing. ``load_exported`` expands them to dense codes and runs
them like the others.

Extending export to a compression kind
--------------------------------------
``run_exporters`` calls ``EXPORTERS[problem.spec.compression.kind](job)`` (register with
``@exporter("kind")``). An exporter reads ``job.assignment`` (``{unit: level}``),
``job.problem`` (``problem.key(unit, level)`` is the level's database key) and
``job.database``, and may:

- slice ``job.model``'s linear layers in place (width: fewer heads or channels); the
  export reads every block's head count, key/value head count (``q_proj``/``k_proj``
  rows over ``head_dim``) and MLP width (``down_proj`` columns) from the modules;
- add unit names (``model.layers.3``, ``model.layers.3.self_attn``, ``model.layers.3.mlp``)
  to ``job.removed``;
- put a ``QuantizedWeight`` per linear layer into ``job.quantized`` (the exact codes; the
  model in memory holds their dequantised values);
- add linear layer names to ``job.semi_structured`` (2:4 sparse weights).

``unit_bytes`` says how many bytes a unit takes at a level in the exported format (a
packed weight's bytes are ``database.quantization.packed_bytes``, the one count of them);
budgets on ``bytes`` and the hardware tables use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel
from safetensors.torch import load_file
from torch import nn

from evosearch import __version__
from evosearch.compression import NM_PATTERN, QuantizationSpace, SearchProblem, SparsityQuantSpace, parse_quant_key
from evosearch.database.quantization import QuantFormat, QuantizedWeight, packed_bytes, recover_grid
from evosearch.database.store import Database
from evosearch.errors import EvosearchError
from evosearch.units import Architecture, ModelUnit, architecture

from evosearch.kernels import quant as qkernel

log = logging.getLogger("evosearch")

FORMATS = ("hf", "packed")
RECORD = "evosearch.json"
MODELING_FILE = "modeling_evosearch.py"
HETEROGENEOUS_MODEL_TYPES = ("llama",)  # model types modeling_evosearch.py can rebuild with unlike blocks
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")  # config lists with one entry per decoder block
VLLM_GROUP_SIZES = (None, 32, 64, 128)
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


# --- levels: what a database key means for export -------------------------------------------------

QUANT_KEY = re.compile(r"^bits=(\d+)(?:,group=(\d+|row))?(,sym)?$")


def quant_format(key: str) -> QuantFormat | None:
    """The format a quantised level's key names (``bits=4``, ``bits=3,group=64``, ``bits=8,group=row,sym``)."""
    match = QUANT_KEY.match(key)
    if not match:
        return None
    group = match[2]
    return QuantFormat(int(match[1]), None if group == "row" else int(group) if group else 128, bool(match[3]))


def is_semi_structured(key: str) -> bool:
    match = NM_PATTERN.match(key)
    return bool(match) and (int(match[1]), int(match[2])) == (2, 4)


def unit_bytes(arch: Architecture, unit: ModelUnit, key: str, compression: BaseModel | None = None) -> int:
    """Bytes ``unit`` takes at the level stored under ``key`` in an export (0 when removed).

    Tensors keep the model's dtypes. Dense, unstructured and 2:4 sparse weights are stored
    dense; a quantised linear layer is packed (``packed_bytes``), in the format of the
    ``compression`` space that made the key (its group size and grid: the quant spaces' keys
    name only the bits) and, for a pruned level, in the smaller of the dense and bitmask
    layouts. A dropped sub-block or block takes its norms with it.
    """
    if key == "drop":
        return 0
    fmt, zeros = _packed_format(key, compression)
    total = 0
    for name in unit.linears:
        layer = arch.module(name)
        weight = layer.weight
        if fmt is None:
            total += weight.numel() * weight.element_size()
        else:
            total += packed_bytes(tuple(weight.shape), fmt, weight.numel() - zeros if zeros else None)
        if layer.bias is not None:
            total += layer.bias.numel() * layer.bias.element_size()
    return total + sum(p.numel() * p.element_size() for p in _other_parameters(arch, unit))


def _packed_format(key: str, compression: BaseModel | None) -> tuple[QuantFormat | None, int]:
    """The packed format of a level's key and the weights it prunes: a quant space's key
    (``bits=B``, ``zeros=Z,bits=B``) in that space's format, else the format the key names."""
    if isinstance(compression, QuantizationSpace) and "bits=" in key and "group=" not in key:
        zeros, bits = parse_quant_key(key)
        return compression.format(bits), zeros
    return quant_format(key), 0


SUB_BLOCK_PARAMETERS = {"self_attn": ("self_attn.", "input_layernorm."),  # Llama names, relative to a block
                        "mlp": ("mlp.", "post_attention_layernorm.")}


def _other_parameters(arch: Architecture, unit: ModelUnit) -> list[torch.Tensor]:
    """Parameters that go with a dropped sub-block or block besides its linear layers (its norms)."""
    if unit.kind == "linear":
        return []
    prefixes = {"attention": SUB_BLOCK_PARAMETERS["self_attn"], "mlp": SUB_BLOCK_PARAMETERS["mlp"],
                "block": ("",)}[unit.kind]
    linear = {id(p) for name in unit.linears for p in arch.module(name).parameters()}
    return [p for name, p in arch.blocks[unit.block].named_parameters()
            if name.startswith(prefixes) and id(p) not in linear]


# --- the job and the exporters per compression kind ---------------------------------------------

@dataclass
class ExportJob:
    model: nn.Module  # the compressed model in memory, the assignment in place
    arch: Architecture
    problem: SearchProblem | None = None
    assignment: dict = field(default_factory=dict)
    database: Database | None = None
    removed: set[str] = field(default_factory=set)  # block, attention or MLP unit names
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # linear name -> codes
    semi_structured: set[str] = field(default_factory=set)  # linear names with 2:4 sparse weights
    bitmask: dict[str, torch.Tensor] = field(default_factory=dict)  # linear name -> kept weights (bitmask layout)


Exporter = Callable[[ExportJob], None]
EXPORTERS: dict[str, Exporter] = {}


def exporter(kind: str) -> Callable[[Exporter], Exporter]:
    """Register the exporter of a compression kind (``SearchProblem.spec.compression.kind``)."""

    def register(function: Exporter) -> Exporter:
        EXPORTERS[kind] = function
        return function

    return register


def run_exporters(job: ExportJob) -> None:
    kind = job.problem.spec.compression.kind
    if kind not in EXPORTERS:
        raise EvosearchError(f"no exporter for compression kind {kind!r}; known: {', '.join(sorted(EXPORTERS))}")
    EXPORTERS[kind](job)


@exporter("sparsity")
def _export_sparsity(job: ExportJob) -> None:
    """Sparse weights are already in place; 2:4 layers are flagged for semi-structured tensors."""
    for unit, level in job.assignment.items():
        if is_semi_structured(job.problem.key(unit, level)):
            job.semi_structured.add(unit)


@exporter("drop")
def _export_drop(job: ExportJob) -> None:
    for unit, level in job.assignment.items():
        if job.problem.key(unit, level) == "drop":
            job.removed.add(unit)


@exporter("quantization")
@exporter("sparsity-quant")
def _export_quantization(job: ExportJob) -> None:
    """Quantised layers hold their dequantised values; the exact codes are recovered from the
    format's grid, so ``--format packed`` stores integer codes, scales and zero points. A layer
    whose weights are off the grid (changed after the search) stays dense rather than be re-rounded.
    A joint (sparsity-quant) layer whose non-zeros make the bitmask layout smaller gets it."""
    comp = job.problem.spec.compression
    for unit, level in job.assignment.items():
        _, bits = parse_quant_key(job.problem.key(unit, level))
        weight = job.arch.module(unit).weight
        grid, exact = recover_grid(weight, comp.format(bits))
        if exact.all():
            job.quantized[unit] = grid
            # The non-zeros, not the pruning mask: the stored weights cannot tell a kept weight at
            # its zero point from a pruned one (module docstring); on the grid, W != 0 iff code != zero.
            keep = weight != 0
            shape, kept = tuple(weight.shape), int(keep.sum())
            joint = isinstance(comp, SparsityQuantSpace)
            if joint and packed_bytes(shape, grid.fmt, kept) < packed_bytes(shape, grid.fmt):
                job.bitmask[unit] = keep.cpu()
        else:
            log.warning("%s: %d of %d weight groups are off its %d-bit grid; it is written dense", unit,
                        int((~exact).sum()), exact.numel(), bits)


@exporter("width")
def _export_width(job: ExportJob) -> None:
    """Pruned heads and channels are zero columns of the output projections: slice them away."""
    from evosearch.subnetwork import slice_to_kept

    job.removed |= slice_to_kept(job.arch, list(job.problem.model_units.values()))


# --- the structure of the exported model ----------------------------------------------------------

@dataclass
class Structure:
    """Which blocks stay (original indices) and each kept block's overrides of the config."""

    kept: list[int]
    overrides: list[dict]

    @property
    def heterogeneous(self) -> bool:
        """Blocks differ from each other (alike blocks with new widths are a plain config)."""
        return any(o != self.overrides[0] or "skip" in o for o in self.overrides)


def plan_structure(job: ExportJob) -> Structure:
    arch, config = job.arch, job.model.config
    heads, kv_heads, head_dim = arch.heads
    kept, overrides = [], []
    for b in range(len(arch.blocks)):
        prefix = arch.block_name(b)
        skip = [part for part, unit in (("self_attn", f"{prefix}.{arch.family.attention}"),
                                        ("mlp", f"{prefix}.{arch.family.mlp}")) if unit in job.removed]
        if prefix in job.removed or len(skip) == 2:
            continue
        block = {"skip": skip} if skip else {}
        if "self_attn" not in skip:
            (q, k, _), _ = arch.attention_linears(b)
            for name, value, default in (("num_attention_heads", arch.module(q).out_features // head_dim, heads),
                                         ("num_key_value_heads", arch.module(k).out_features // head_dim, kv_heads)):
                if value != default:
                    block[name] = value
        if "mlp" not in skip:
            channels = arch.module(arch.mlp_linears(b)[1]).in_features
            if channels != (getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)):
                block["intermediate_size"] = channels
        kept.append(b)
        overrides.append(block)
    if not kept:
        raise EvosearchError("the assignment removes every decoder block; nothing is left to export")
    structure = Structure(kept, overrides)
    if any(structure.overrides) and config.model_type not in HETEROGENEOUS_MODEL_TYPES:
        raise EvosearchError(f"exporting blocks that differ (dropped attention/MLP, sliced widths) supports model "
                             f"types {', '.join(HETEROGENEOUS_MODEL_TYPES)}, not {config.model_type!r}; drop whole "
                             f"blocks instead")
    return structure


def exported_config(config, structure: Structure):
    """The config of the exported model: fewer layers, per-layer lists filtered, unlike blocks described."""
    from evosearch.modeling_evosearch import EvosearchLlamaConfig

    data = config.to_dict()
    old_layers = data["num_hidden_layers"]
    data["num_hidden_layers"] = len(structure.kept)
    for name in PER_LAYER_LISTS:
        if isinstance(data.get(name), list) and len(data[name]) == old_layers:
            data[name] = [data[name][b] for b in structure.kept]
    for name in ("quantization_config", "auto_map", "evosearch_layers", "transformers_version"):
        data.pop(name, None)
    if not structure.heterogeneous:
        return type(config).from_dict(data | structure.overrides[0])
    data |= {"model_type": EvosearchLlamaConfig.model_type, "architectures": ["EvosearchLlamaForCausalLM"],
             "evosearch_layers": structure.overrides,
             "auto_map": {"AutoConfig": "modeling_evosearch.EvosearchLlamaConfig",
                          "AutoModelForCausalLM": "modeling_evosearch.EvosearchLlamaForCausalLM"}}
    return EvosearchLlamaConfig.from_dict(data)


def _renamer(arch: Architecture, structure: Structure) -> Callable[[str], str | None]:
    """Maps a parameter name of the searched model to its name in the export (None: removed)."""
    new_index = {b: i for i, b in enumerate(structure.kept)}
    pattern = re.compile(rf"^{re.escape(arch.family.layers)}\.(\d+)\.(.*)$")
    skipped = {b: tuple(p for part in overrides.get("skip", ()) for p in SUB_BLOCK_PARAMETERS[part])
               for b, overrides in zip(structure.kept, structure.overrides)}

    def rename(name: str) -> str | None:
        match = pattern.match(name)
        if not match:
            return name
        b, rest = int(match[1]), match[2]
        if b not in new_index or rest.startswith(skipped[b]):
            return None
        return f"{arch.family.layers}.{new_index[b]}.{rest}"

    return rename


# --- writing ---------------------------------------------------------------------------------------

@dataclass
class ExportReport:
    folder: Path
    format: str
    blocks: int  # decoder blocks in the export
    parameters: int  # weights and biases the export holds (a packed weight counts out x in)
    tensor_bytes: int  # bytes of every tensor written
    record: dict


def export_model(job: ExportJob, out: str | Path, *, format: str = "hf", tokenizer=None,
                 record: dict | None = None) -> ExportReport:
    """Write the compressed model ``job`` describes to ``out`` (see the module docstring)."""
    if format not in FORMATS:
        raise EvosearchError(f"--format {format!r} is not known; use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise EvosearchError(f"export folder {out} is not empty; choose a new folder or empty it")
    out.mkdir(parents=True, exist_ok=True)
    structure = plan_structure(job)
    config = exported_config(job.model.config, structure)
    rename = _renamer(job.arch, structure)
    tied = {"lm_head.weight"} if getattr(job.model.config, "tie_word_embeddings", False) else set()

    tensors, parameters, packed, bitmask = {}, 0, {}, set()
    for name, tensor in job.model.state_dict().items():
        new = rename(name)
        if new is None or name in tied:
            continue
        linear = name.removesuffix(".weight")
        if format == "packed" and name.endswith(".weight") and linear in job.quantized:
            qw = job.quantized[linear]
            if tuple(qw.codes.shape) != tuple(tensor.shape):
                raise EvosearchError(f"quantised codes of {linear} have shape {tuple(qw.codes.shape)}, the layer "
                                     f"{tuple(tensor.shape)}")
            prefix = new.removesuffix(".weight")
            keep = job.bitmask.get(linear)
            tensors |= {f"{prefix}.{k}": v for k, v in pack_quantized(qw, keep).items()}
            packed[prefix] = qw.fmt
            if keep is not None:
                bitmask.add(prefix)
        else:
            tensors[new] = tensor.detach().to("cpu", copy=True).contiguous()
        parameters += tensor.numel()
    if parameters == 0:
        raise EvosearchError("nothing to export")
    _save_tensors(tensors, out, evosearch_only=bool(bitmask))
    # Bitmask layers are evosearch's own layout: not compressed-tensors targets (it cannot read them).
    targets = {name: fmt for name, fmt in packed.items() if name not in bitmask}
    if targets:
        config.quantization_config = compressed_tensors_config(targets, _linear_names(job, rename, set(targets)))
    if bitmask:
        log.info("%d layers in the bitmask layout: only evosearch's load_exported reads them", len(bitmask))
    config.save_pretrained(out)
    if structure.heterogeneous:
        shutil.copyfile(Path(__file__).with_name(MODELING_FILE), out / MODELING_FILE)
    generation = getattr(job.model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)

    names = {name: rename(f"{name}.weight").removesuffix(".weight") for name in job.semi_structured
             if rename(f"{name}.weight") is not None}
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    full = {
        "evosearch": __version__,
        "format": format,
        "blocks": {"kept": structure.kept, "of": len(job.arch.blocks), "overrides": structure.overrides},
        "removed": sorted(job.removed),
        "packed": {name: {"bits": f.bits, "group_size": f.group_size, "symmetric": f.symmetric}
                   for name, f in packed.items()},
        "bitmask": sorted(bitmask),
        "semi_structured": sorted(names.values()),
        "parameters": parameters,
        "tensor_bytes": tensor_bytes,
        "vllm": vllm_support(config, packed, structure, bitmask),
        "assignment": job.assignment,
    } | (record or {})
    (out / RECORD).write_text(json.dumps(full, indent=1, default=str))
    log.info("exported %d of %d blocks, %d packed and %d 2:4 layers, %.1f MB of tensors to %s",
             len(structure.kept), len(job.arch.blocks), len(packed), len(names), tensor_bytes / 1e6, out)
    return ExportReport(out, format, len(structure.kept), parameters, tensor_bytes, full)


def _save_tensors(tensors: dict[str, torch.Tensor], out: Path, *, evosearch_only: bool = False) -> None:
    """``model.safetensors`` (sharded past 5 GB); ``evosearch_only``: under another name, so that
    ``from_pretrained`` refuses the folder (no weights file it knows) instead of initialising the
    layers it cannot read at random."""
    from huggingface_hub import save_torch_state_dict

    pattern = "evosearch-bitmask{suffix}.safetensors" if evosearch_only else "model{suffix}.safetensors"
    save_torch_state_dict(tensors, out, filename_pattern=pattern, max_shard_size="5GB")


def _linear_names(job: ExportJob, rename, exclude: set[str]) -> list[str]:
    """Export names of the linear layers that are not packed (compressed-tensors' ``ignore``)."""
    names = []
    for name, module in job.model.named_modules():
        if isinstance(module, nn.Linear):
            new = rename(f"{name}.weight")
            if new is not None and new.removesuffix(".weight") not in exclude:
                names.append(new.removesuffix(".weight"))
    return names


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


def vllm_support(config, packed: dict[str, QuantFormat], structure: Structure,
                 bitmask: set[str] = frozenset()) -> dict:
    """Whether vLLM can serve the export as written, and if not, why."""
    reasons = []
    if structure.heterogeneous:
        reasons.append("blocks differ (evosearch_llama); vLLM serves plain Llama blocks")
    for name in sorted(bitmask):
        reasons.append(f"{name}: evosearch's bitmask layout, which only load_exported reads")
    for name, fmt in sorted(packed.items()):
        if fmt.bits not in (4, 8) or fmt.group_size not in VLLM_GROUP_SIZES:
            reasons.append(f"{name}: {fmt.bits}-bit, group {fmt.group_size} (vLLM: 4 or 8 bits, group "
                           f"32/64/128/row)")
    for siblings in FUSED_SIBLINGS:
        prefixes = {n.rsplit(".", 1)[0] for n in packed if n.rsplit(".", 1)[1] in siblings}
        for prefix in sorted(prefixes):
            fmts = {packed.get(f"{prefix}.{s}") for s in siblings}
            if len(fmts) > 1:
                reasons.append(f"{prefix}: {'/'.join(siblings)} differ in format; vLLM fuses them")
    return {"servable": not reasons, "reasons": reasons}


# --- loading ---------------------------------------------------------------------------------------

class PackedLinear(nn.Module):
    """A linear layer whose weight stays packed; its forward runs the dequantising matmul."""

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        groups = 1 if fmt.group_size is None else math.ceil(in_features / fmt.group_size)
        self.register_buffer("weight_packed", torch.empty(out_features, qkernel.words_per_row(in_features, fmt.bits),
                                                          dtype=torch.int32))
        self.register_buffer("weight_scale", torch.empty(out_features, groups, dtype=torch.float32))
        if not fmt.symmetric:
            self.register_buffer("weight_zero_point", torch.empty(qkernel.words_per_row(out_features, fmt.bits),
                                                                  groups, dtype=torch.int32))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features]))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.uint8), persistent=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def unpack_zeros(self) -> None:
        """Fill ``zeros`` (one uint8 per row and group, what the kernel reads) from the loaded tensors."""
        if self.fmt.symmetric:
            self.zeros = torch.full_like(self.weight_scale, self.fmt.symmetric_zero, dtype=torch.uint8)
        else:
            packed = self.weight_zero_point.T.contiguous()
            self.zeros = qkernel.unpack(packed, self.fmt.bits, self.out_features).T.to(torch.uint8).contiguous()

    def packed_weight(self) -> qkernel.PackedWeight:
        return qkernel.PackedWeight(self.weight_packed, self.weight_scale, self.zeros, self.fmt.bits,
                                    self.fmt.group_size, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = qkernel.dequant_matmul(x, self.packed_weight())
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.fmt.bits}, "
                f"group_size={self.fmt.group_size}, symmetric={self.fmt.symmetric}")


def read_record(folder: str | Path) -> dict:
    path = Path(folder) / RECORD
    if not path.exists():
        raise EvosearchError(f"{folder} is not an evosearch export (no {RECORD}); export a search with "
                             f"`evosearch export RESULT_DIR`")
    return json.loads(path.read_text())


def load_exported(folder: str | Path, *, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, semi_structured: bool = True):
    """Load an export as ``(model, tokenizer)``: packed layers stay packed, 2:4 layers become
    semi-structured sparse tensors where the GPU runs them (``semi_structured=False`` keeps them dense)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from evosearch.model import resolve_device
    from evosearch.modeling_evosearch import EvosearchLlamaConfig, EvosearchLlamaForCausalLM

    folder = Path(folder)
    record = read_record(folder)
    device = resolve_device(device)
    config_data = json.loads((folder / "config.json").read_text())
    config_data.pop("quantization_config", None)
    config_data.pop("auto_map", None)
    if config_data.get("model_type") == EvosearchLlamaConfig.model_type:
        config, cls = EvosearchLlamaConfig.from_dict(config_data), EvosearchLlamaForCausalLM
    else:
        config = AutoConfig.for_model(**config_data)
        cls = AutoModelForCausalLM
    with _parameters_on_meta():
        model = cls._from_config(config) if cls is not AutoModelForCausalLM else cls.from_config(config)
    formats = {name: QuantFormat(spec["bits"], spec["group_size"], spec["symmetric"])
               for name, spec in record["packed"].items()}
    for name, fmt in formats.items():
        layer = model.get_submodule(name)
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child,
                PackedLinear(layer.in_features, layer.out_features, fmt, layer.bias is not None))
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state |= load_file(str(path))
    for name in record.get("bitmask", []):  # to dense codes: the packed layer and its kernel run them
        local = {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}
        state[f"{name}.weight_packed"] = expand_bitmask(local, formats[name])
        del state[f"{name}.weight_mask"]
    target = dtype or next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    buffers = {name for name, _ in model.named_buffers()}
    state = {name: t if name in buffers or not t.is_floating_point() else t.to(target) for name, t in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise EvosearchError(f"{folder}: weights do not match the config (missing {sorted(set(missing) - tied)[:3]}, "
                             f"unexpected {unexpected[:3]})")
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.unpack_zeros()
    model.to(device).eval().requires_grad_(False)
    if semi_structured and record["semi_structured"]:
        to_semi_structured(model, record["semi_structured"])
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model, tokenizer


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with parameters on the meta device (no memory) and buffers real (rotary tables)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def semi_structured_supported(device: torch.device) -> bool:
    """PyTorch's 2:4 semi-structured kernels need a CUDA GPU of compute capability 8.0 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def to_semi_structured(model: nn.Module, names: list[str]) -> int:
    """Turn the listed linear layers' 2:4 weights into semi-structured sparse tensors; returns how many."""
    device = next(model.parameters()).device
    if not semi_structured_supported(device):
        log.info("2:4 layers stay dense: semi-structured sparse tensors need a CUDA GPU with compute capability "
                 ">= 8.0 (this is %s)", device)
        return 0
    from torch.sparse import to_sparse_semi_structured

    done = 0
    for name in names:
        layer = model.get_submodule(name)
        dense = layer.weight
        try:
            layer.weight = nn.Parameter(to_sparse_semi_structured(dense.data), requires_grad=False)
            for shape in ((1, layer.in_features), (2, 3, layer.in_features)):  # decode and prefill shapes run
                layer(torch.ones(shape, device=dense.device, dtype=dense.dtype))
            done += 1
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            layer.weight = dense
            log.warning("%s stays dense: %s", name, (str(exc).strip() or type(exc).__name__).splitlines()[0])
    return done


# --- from a search's output folder ---------------------------------------------------------------

def export_result(result_dir: str | Path, out: str | Path, *, format: str = "hf") -> ExportReport:
    """Export the model a search wrote (``RESULT_DIR/result.json`` and ``RESULT_DIR/model``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evosearch.compression import CompressionSpace
    from evosearch.pipeline import SearchSettings

    result_dir = Path(result_dir)
    path = result_dir / "result.json"
    if not path.exists() or not (result_dir / "model" / "config.json").exists():
        raise EvosearchError(f"{result_dir} is not a finished search: it needs result.json and model/ "
                             f"(from `evosearch search --out {result_dir}`)")
    result = json.loads(path.read_text())
    settings = SearchSettings(**result["settings"])
    model = AutoModelForCausalLM.from_pretrained(result_dir / "model", dtype="auto").eval().requires_grad_(False)
    has_tokenizer = (result_dir / "model" / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(result_dir / "model") if has_tokenizer else None
    arch = architecture(model)
    spec = CompressionSpace.load(settings.space)
    problem = (spec.materialize(arch, settings.budget) if settings.budget_resource is None
               else spec.materialize_levels(arch))
    root = result.get("database")
    database = Database(root) if root and Path(root).exists() else None
    job = ExportJob(model, arch, problem, result["assignment"], database)
    run_exporters(job)
    search = {key: result[key] for key in ("settings", "budget", "fitness", "perplexity", "versions") if key in result}
    return export_model(job, out, format=format, tokenizer=tokenizer, record={"search": search})
