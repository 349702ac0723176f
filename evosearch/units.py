"""What can be compressed in a model: its units, found through one small adapter per family.

A *family* is a table of module names: where the decoder blocks are, and which linear
layers in a block feed and close the attention and the MLP. Families are recognised by
module structure, not by class name, so a new model laid out like Llama works without a
code change. Adding a family is adding one ``Family`` to ``FAMILIES``.

Unit names are module paths (``model.layers.3.mlp.down_proj``), so they match the
model's ``state_dict`` keys. Kinds:

- ``linear``: one linear layer (sparsity, bit-width);
- ``attention``: a block's attention (drop it, or keep a fraction of its heads);
- ``mlp``: a block's MLP (drop it, or keep a fraction of its channels);
- ``block``: a whole decoder block (drop it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from evosearch.errors import EvosearchError


@dataclass(frozen=True)
class Family:
    name: str
    layers: str  # path from the model to the ModuleList of decoder blocks
    attention: str  # the attention module, relative to a block
    mlp: str  # the MLP's name relative to a block ("mlp"; for OPT a name only: its linears sit on the block)
    attention_inputs: tuple[str, ...]  # q, k, v projections, relative to a block
    attention_output: str
    mlp_inputs: tuple[str, ...]  # gate/up (or fc1), relative to a block
    mlp_output: str
    attention_norm: str  # the norm in front of the attention, relative to a block (it goes when the attention does)
    mlp_norm: str  # the norm in front of the MLP
    final: tuple[str, ...]  # modules after the last block, in order (final norm...); absent ones are skipped
    examples: str  # for messages: models known to match
    mlp_activation: str | None = None  # where the MLP is no module (OPT), the block's activation between its layers


LLAMA = Family(
    name="llama", layers="model.layers", attention="self_attn", mlp="mlp",
    attention_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attention_output="self_attn.o_proj",
    mlp_inputs=("mlp.gate_proj", "mlp.up_proj"), mlp_output="mlp.down_proj",
    attention_norm="input_layernorm", mlp_norm="post_attention_layernorm", final=("model.norm",),
    examples="Llama, Mistral, Qwen2/3, SmolLM, Phi-3-style layouts with separate q/k/v",
)
OPT = Family(
    name="opt", layers="model.decoder.layers", attention="self_attn", mlp="mlp",
    attention_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attention_output="self_attn.out_proj",
    mlp_inputs=("fc1",), mlp_output="fc2", attention_norm="self_attn_layer_norm", mlp_norm="final_layer_norm",
    final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
    examples="OPT", mlp_activation="activation_fn",
)
FAMILIES = (LLAMA, OPT)

UNIT_KINDS = ("linear", "attention", "mlp", "block")


@dataclass(frozen=True)
class ModelUnit:
    """One compressible part of a model."""

    name: str
    kind: str  # one of UNIT_KINDS
    block: int
    params: int  # parameters it holds (weights and biases)
    linears: tuple[str, ...]  # full module paths of the linear layers it consists of
    shape: tuple[int, int] | None = None  # (out_features, in_features) for a linear unit
    width: dict[str, int] = field(default_factory=dict)  # heads, kv_heads, head_dim / channels


class Architecture:
    """A loaded model seen through its family's table."""

    def __init__(self, model: nn.Module, family: Family):
        self.model = model
        self.family = family
        self.config = model.config

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.family.layers)

    def block_name(self, index: int) -> str:
        return f"{self.family.layers}.{index}"

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the model does to the last block's output before the output head."""
        for name in self.family.final:
            parent, _, child = name.rpartition(".")
            module = getattr(self.model.get_submodule(parent), child, None)
            if module is not None:
                hidden = module(hidden)
        return hidden

    def linears(self, block: int) -> list[str]:
        """Full paths of the block's linear layers, in forward order."""
        f = self.family
        return [f"{self.block_name(block)}.{rel}" for rel in (*f.attention_inputs, f.attention_output,
                                                               *f.mlp_inputs, f.mlp_output)]

    def attention_linears(self, block: int) -> tuple[list[str], str]:
        prefix = self.block_name(block)
        return [f"{prefix}.{r}" for r in self.family.attention_inputs], f"{prefix}.{self.family.attention_output}"

    def mlp_linears(self, block: int) -> tuple[list[str], str]:
        prefix = self.block_name(block)
        return [f"{prefix}.{r}" for r in self.family.mlp_inputs], f"{prefix}.{self.family.mlp_output}"

    def sub_block_prefixes(self, kind: str) -> tuple[str, ...]:
        """Parameter-name prefixes, relative to a block, of what an attention or MLP sub-block (or a
        whole block) consists of: its module or linear layers and the norm in front of it."""
        f = self.family
        if kind == "attention":
            return f"{f.attention}.", f"{f.attention_norm}."
        if kind == "mlp":
            return f"{f.mlp}.", *(f"{name}." for name in (*f.mlp_inputs, f.mlp_output)), f"{f.mlp_norm}."
        if kind == "block":
            return ("",)
        raise ValueError(f"{kind!r} is not a sub-block kind")

    def other_parameters(self, unit: ModelUnit) -> list[torch.Tensor]:
        """Parameters that go with a sub-block or block besides its linear layers (its norms)."""
        if unit.kind == "linear":
            return []
        linear = {id(p) for name in unit.linears for p in self.module(name).parameters()}
        prefixes = self.sub_block_prefixes(unit.kind)
        return [p for name, p in self.blocks[unit.block].named_parameters()
                if name.startswith(prefixes) and id(p) not in linear]

    def norm(self, block: int, kind: str) -> nn.Module:
        """The norm in front of a block's attention or MLP."""
        name = self.family.attention_norm if kind == "attention" else self.family.mlp_norm
        return self.blocks[block].get_submodule(name)

    def sub_block(self, unit: ModelUnit) -> nn.Module:
        """The module that computes a unit alone (``evosearch profile`` times it): a linear layer, the
        attention, the MLP (its layers around the activation where the family has no MLP module), a block."""
        if unit.kind != "mlp":
            return self.module(unit.name)
        block = self.blocks[unit.block]
        if self.family.mlp_activation is None:
            return block.get_submodule(self.family.mlp)
        inputs, output = self.mlp_linears(unit.block)
        return _InlineMLP([self.module(n) for n in inputs], getattr(block, self.family.mlp_activation),
                          self.module(output))

    def fused_inputs(self) -> tuple[tuple[str, ...], ...]:
        """Input projections that read one input and that runtimes fuse into one matrix product (q/k/v,
        gate/up), relative to a block."""
        return tuple(group for group in (self.family.attention_inputs, self.family.mlp_inputs) if len(group) > 1)

    def output_linears(self, unit: ModelUnit) -> list[str]:
        """The output projections of an attention, MLP or block unit: zeroed, the unit adds nothing."""
        outputs = {"attention": [self.attention_linears(unit.block)[1]], "mlp": [self.mlp_linears(unit.block)[1]],
                   "block": [self.attention_linears(unit.block)[1], self.mlp_linears(unit.block)[1]]}
        return outputs[unit.kind]

    def is_dropped(self, unit: ModelUnit) -> bool:
        """A sub-block or block is dropped when its output projections are all zeros."""
        return all(not self.module(name).weight.any() for name in self.output_linears(unit))

    @property
    def heads(self) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dimension)."""
        c = self.config
        heads = c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return heads, kv_heads, head_dim

    def units(self, kinds: str | tuple[str, ...] | None = None) -> list[ModelUnit]:
        """Every unit of the given kinds (default: all), block by block."""
        kinds = UNIT_KINDS if kinds is None else ((kinds,) if isinstance(kinds, str) else tuple(kinds))
        for kind in kinds:
            if kind not in UNIT_KINDS:
                raise EvosearchError(f"unit kind {kind!r} is not known; use one of {', '.join(UNIT_KINDS)}")
        heads, kv_heads, head_dim = self.heads
        found: list[ModelUnit] = []
        for b in range(len(self.blocks)):
            attn_in, attn_out = self.attention_linears(b)
            mlp_in, mlp_out = self.mlp_linears(b)
            prefix = self.block_name(b)
            if "block" in kinds:
                found.append(ModelUnit(prefix, "block", b, self._params(self.linears(b)), tuple(self.linears(b))))
            if "attention" in kinds:
                names = (*attn_in, attn_out)
                found.append(ModelUnit(f"{prefix}.{self.family.attention}", "attention", b, self._params(names),
                                       names, width={"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}))
            if "mlp" in kinds:
                names = (*mlp_in, mlp_out)
                channels = self.module(mlp_out).in_features
                found.append(ModelUnit(f"{prefix}.{self.family.mlp}", "mlp", b, self._params(names), names,
                                       width={"channels": channels}))
            if "linear" in kinds:
                for name in self.linears(b):
                    layer = self.module(name)
                    found.append(ModelUnit(name, "linear", b, self._params([name]), (name,),
                                           shape=(layer.out_features, layer.in_features)))
        return found

    def _params(self, linears) -> int:
        return sum(p.numel() for name in linears for p in self.module(name).parameters())


class _InlineMLP(nn.Module):
    """An MLP whose layers sit on the block (OPT: fc1, activation, fc2) as one module."""

    def __init__(self, inputs: list[nn.Module], activation, output: nn.Module):
        super().__init__()
        if len(inputs) != 1:
            raise ValueError("an inline MLP has one input projection")
        self.inner, self.activation, self.output = inputs[0], activation, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.activation(self.inner(x)))


def architecture(model: nn.Module) -> Architecture:
    """Recognise the model's family from its module structure."""
    for family in FAMILIES:
        if _matches(model, family):
            return Architecture(model, family)
    supported = "; ".join(f"{f.name} ({f.examples}: {f.layers}.N.{f.attention_inputs[0]} ...)" for f in FAMILIES)
    raise EvosearchError(
        f"unknown architecture {type(model).__name__}: evosearch supports decoder blocks laid out as {supported}; "
        f"add a Family to evosearch/units.py for another layout")


def _matches(model: nn.Module, family: Family) -> bool:
    try:
        blocks = model.get_submodule(family.layers)
    except AttributeError:
        return False
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return False
    relative = (*family.attention_inputs, family.attention_output, *family.mlp_inputs, family.mlp_output)
    for block in blocks:
        for name in relative:
            try:
                if not isinstance(block.get_submodule(name), nn.Linear):
                    return False
            except AttributeError:
                return False
    return True


def count_parameters(model: nn.Module, *, nonzero: bool = False) -> int:
    """Parameters of the model (tied weights once); with ``nonzero``, only entries that are not zero."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += int(torch.count_nonzero(p)) if nonzero else p.numel()
    return total
