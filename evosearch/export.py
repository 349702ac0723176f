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

``packed``: as ``hf``, except that each quantised linear layer is stored in compressed-tensors'
``pack-quantized`` layout, or, for a pruned and quantised layer where that is smaller, in
evosearch's bitmask layout (``evosearch.layouts`` documents both, byte for byte).
``config.json`` carries a compressed-tensors ``quantization_config`` (``quant_method:
compressed-tensors``, ``format: pack-quantized``, one config group per format whose
``targets`` are the layer names, every other linear layer in ``ignore``), so
``from_pretrained`` with the ``compressed-tensors`` package installed loads the
pack-quantized layers (as dense weights); vLLM's int4/int8 weight-only kernels serve 4- and
8-bit layers with a group size of 32, 64, 128 or a whole row, when the fused input
projections (q/k/v, gate/up) share a format and the blocks are plain Llama blocks;
``evosearch.json`` says whether that holds (``vllm``). Bitmask layers are not compressed-tensors
targets (it cannot read them): such an export's weights are written as
``evosearch-bitmask.safetensors``, so that ``from_pretrained`` stops with "no file named
model.safetensors" rather than load the model with those layers missing.
``evosearch.runtime.load_exported(folder)`` reads every layout, keeps the codes packed and
multiplies through the dequantising kernel in ``kernels/quant.py``.

What each unit becomes is its kind's decision (``Compression.export``, in ``evosearch.kinds``):
it reads ``job.levels`` (``{unit: Level}``) and may slice ``job.model``'s linear layers in
place (the export reads every block's head count, key/value head count and MLP width back
from the modules), add unit names to ``job.removed``, put a ``QuantizedWeight`` per linear
layer into ``job.quantized`` (the exact codes; the model in memory holds their dequantised
values) and a kept-weights mask into ``job.bitmask``, or add linear layer names to
``job.semi_structured`` (2:4 sparse weights).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from evosearch.database.quantization import QuantFormat
from evosearch.database.store import Database
from evosearch.errors import EvosearchError
from evosearch.kinds.base import ExportJob  # noqa: F401 (what a kind fills in, export reads: kinds.base)
from evosearch.layouts import compressed_tensors_config, pack_quantized
from evosearch.runtime import RECORD
from evosearch.units import Architecture, architecture
from evosearch.version import __version__

log = logging.getLogger("evosearch")

FORMATS = ("hf", "packed")
MODELING_FILE = "modeling_evosearch.py"
HETEROGENEOUS_MODEL_TYPES = ("llama",)  # model types modeling_evosearch.py can rebuild with unlike blocks
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")  # config lists with one entry per decoder block
VLLM_GROUP_SIZES = (None, 32, 64, 128)


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
    sub_block = {"self_attn": "attention", "mlp": "mlp"}  # a block's "skip" entries name the sub-blocks so
    skipped = {b: tuple(p for part in overrides.get("skip", ()) for p in arch.sub_block_prefixes(sub_block[part]))
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
        "vllm": vllm_support(job.arch, packed, structure, bitmask),
        "levels": {unit: level.name for unit, level in job.levels.items()},
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


def vllm_support(arch: Architecture, packed: dict[str, QuantFormat], structure: Structure,
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
    for group in arch.fused_inputs():
        for b in range(len(structure.kept)):
            prefix = arch.block_name(b)  # the export's numbering of blocks (renamed names)
            fmts = {packed.get(f"{prefix}.{rel}") for rel in group}
            if len(fmts) > 1:
                module, _, _ = f"{prefix}.{group[0]}".rpartition(".")
                names = "/".join(rel.rsplit(".", 1)[-1] for rel in group)
                reasons.append(f"{module}: {names} differ in format; vLLM fuses them")
    return {"servable": not reasons, "reasons": reasons}


# --- from a search's output folder ---------------------------------------------------------------

def export_result(result_dir: str | Path, out: str | Path, *, format: str = "hf") -> ExportReport:
    """Export the model a search wrote (``RESULT_DIR/result.json`` and ``RESULT_DIR/model``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evosearch.run import RunFolder

    folder = RunFolder(result_dir)
    result = folder.read_result()
    model = AutoModelForCausalLM.from_pretrained(folder.model_path, dtype="auto").eval().requires_grad_(False)
    has_tokenizer = (folder.model_path / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(folder.model_path) if has_tokenizer else None
    arch = architecture(model)
    database = Database(result.database) if result.database and Path(result.database).exists() else None
    job = ExportJob(model, arch, result.space_spec().compression, result.levels_for(arch), database=database)
    job.kind.export(job)
    search = result.model_dump(mode="json", include={"settings", "budget", "fitness", "perplexity", "versions"})
    return export_model(job, out, format=format, tokenizer=tokenizer,
                        record={"assignment": result.assignment, "search": search})
