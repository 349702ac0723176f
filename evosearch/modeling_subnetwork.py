"""A Llama model whose blocks each keep their own number of heads and MLP channels.

evosearch's sub-network export (``evosearch.subnetwork.export_subnetwork``) saves this
file beside the weights and names it in config.json's ``auto_map``, so that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` builds the model
anywhere transformers is installed; evosearch itself loads such a folder with this, its
own copy, and never runs the file in the folder. It depends on transformers alone.

transformers' Llama takes one head count and one MLP width for every block, and its
per-layer configuration (``per_layer_config``) is read only by the model classes written
for it, not by Llama's. So the configuration adds three lists of one number per block:

    layer_heads               query heads (0: the attention was removed)
    layer_kv_heads            key/value heads, in the source model's ratio to the query heads
    layer_intermediate_sizes  MLP channels (0: the MLP was removed)

Each block is built with the standard Llama modules at its own size. A removed
attention or MLP has no weights (not even its RMSNorm) and adds nothing to the residual
stream. The cache holds the kept attentions only, numbered consecutively, so that its
first layer is always one that sees every token.
"""

import copy

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP


class SubnetworkLlamaConfig(LlamaConfig):
    model_type = "evosearch_llama"


class RemovedAttention(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


class SubnetworkLlamaForCausalLM(LlamaForCausalLM):
    config_class = SubnetworkLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        cache_layer = 0
        for i, layer in enumerate(self.model.layers):
            sized = copy.copy(config)
            sized.num_attention_heads = config.layer_heads[i] or config.num_attention_heads
            sized.num_key_value_heads = config.layer_kv_heads[i] or config.num_key_value_heads
            sized.intermediate_size = config.layer_intermediate_sizes[i]
            if config.layer_heads[i]:
                layer.self_attn = LlamaAttention(sized, cache_layer)
                cache_layer += 1
            else:
                layer.self_attn = RemovedAttention()
                layer.input_layernorm = nn.Identity()
            if config.layer_intermediate_sizes[i]:
                layer.mlp = LlamaMLP(sized)
            else:
                layer.mlp = RemovedMLP()
                layer.post_attention_layernorm = nn.Identity()
        self.post_init()
