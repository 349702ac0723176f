"""A Llama whose decoder blocks differ: some without attention or MLP, each with its own widths.

evosearch copies this file beside the weights of an export whose blocks are not all alike
(``config.json``'s ``auto_map`` names it), so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

builds the model. It imports only torch and transformers' Llama modules.

``config.evosearch_layers`` has one entry per decoder block: the attributes of the global
config that differ in that block (``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size``) and ``skip``, the sub-blocks it lacks (``"self_attn"``, ``"mlp"``).
The entries follow transformers' own per-layer overrides (``per_layer_config``, whose
``skip`` lists absent sub-modules), which Llama's modeling code does not apply.

A block without attention has no parameters, no compute and no KV cache for it: the
attention modules are numbered (``layer_idx``, the KV-cache index) over the blocks that
keep one, so the cache's layers 0..A-1 are the A real attentions, and the cache layers
past A are never written (a dynamic cache allocates nothing for them). A block without
its MLP skips the MLP's norm too. Dropping a whole block is not expressed here: such
blocks are removed and ``num_hidden_layers`` counts the rest.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
)

SUB_BLOCKS = ("self_attn", "mlp")


class EvosearchLlamaConfig(LlamaConfig):
    model_type = "evosearch_llama"


def block_config(config: LlamaConfig, overrides: dict) -> LlamaConfig:
    """The global config with one block's overrides applied (``skip`` is not an attribute)."""
    block = copy.copy(config)
    for name, value in overrides.items():
        if name != "skip":
            setattr(block, name, value)
    return block


class EvosearchDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: LlamaConfig, overrides: dict, attention_index: int | None):
        super(LlamaDecoderLayer, self).__init__()  # the layer's parts are built here, not by Llama's __init__
        block = block_config(config, overrides)
        self.hidden_size = config.hidden_size
        self.self_attn = self.input_layernorm = self.mlp = self.post_attention_layernorm = None
        if attention_index is not None:
            self.self_attn = LlamaAttention(config=block, layer_idx=attention_index)
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if "mlp" not in overrides.get("skip", ()):
            self.mlp = LlamaMLP(block)
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        if self.self_attn is not None:
            residual = hidden_states
            hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                              attention_mask=attention_mask, position_embeddings=position_embeddings,
                                              **kwargs)
            hidden_states = residual + hidden_states
        if self.mlp is not None:
            residual = hidden_states
            hidden_states = residual + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class EvosearchLlamaModel(LlamaModel):
    config_class = EvosearchLlamaConfig

    def __init__(self, config: EvosearchLlamaConfig):
        super().__init__(config)
        layers = config.evosearch_layers
        if len(layers) != config.num_hidden_layers:
            raise ValueError(f"evosearch_layers has {len(layers)} entries for {config.num_hidden_layers} layers")
        attention_index, blocks = 0, []
        for overrides in layers:
            unknown = set(overrides.get("skip", ())) - set(SUB_BLOCKS)
            if unknown:
                raise ValueError(f"evosearch_layers: skip names {sorted(unknown)}; only {SUB_BLOCKS} can be skipped")
            has_attention = "self_attn" not in overrides.get("skip", ())
            blocks.append(EvosearchDecoderLayer(config, overrides, attention_index if has_attention else None))
            attention_index += has_attention
        self.layers = nn.ModuleList(blocks)


class EvosearchLlamaForCausalLM(LlamaForCausalLM):
    config_class = EvosearchLlamaConfig
    _no_split_modules = ["EvosearchDecoderLayer"]

    def __init__(self, config: EvosearchLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = EvosearchLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
