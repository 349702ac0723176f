"""Running what export wrote: the layouts of ``evosearch.layouts`` loaded into modules that compute with them.

- ``PackedLinear``: a pack-quantized (or, expanded on loading, bitmask) layer whose codes stay
  packed; its forward is the dequantising matmul of ``kernels/quant.py``.
- 2:4 layers become PyTorch semi-structured sparse tensors where the GPU runs them
  (``to_semi_structured``), and stay dense elsewhere.
- ``load_exported(folder)``: an export folder as ``(model, tokenizer)``, every layer in the
  layout ``evosearch.json`` records for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from evosearch.database.quantization import QuantFormat
from evosearch.errors import EvosearchError
from evosearch.kernels import quant as qkernel
from evosearch.layouts import expand_bitmask

log = logging.getLogger("evosearch")

RECORD = "evosearch.json"


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
