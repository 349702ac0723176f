import pytest
from torch import nn

from evosearch.errors import EvosearchError
from evosearch.units import architecture, count_parameters


def test_llama_units(llama):
    arch = architecture(llama)
    assert arch.family.name == "llama"
    linears = arch.units("linear")
    assert len(linears) == 2 * 7
    assert linears[0].name == "model.layers.0.self_attn.q_proj" and linears[0].shape == (64, 64)
    assert {u.name.rsplit(".", 1)[1] for u in linears} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"}
    attention = arch.units("attention")[1]
    assert attention.name == "model.layers.1.self_attn"
    assert attention.width == {"heads": 4, "kv_heads": 2, "head_dim": 16}
    assert arch.units("mlp")[0].width == {"channels": 128}
    # every parameter of every block's linears is in exactly one linear unit
    block_linear_params = sum(p.numel() for n, m in llama.named_modules() if isinstance(m, nn.Linear)
                              and n.startswith("model.layers") for p in m.parameters())
    assert sum(u.params for u in linears) == block_linear_params
    assert sum(u.params for u in arch.units("block")) == block_linear_params


def test_opt_units(opt):
    arch = architecture(opt)
    assert arch.family.name == "opt"
    names = [u.name for u in arch.units("linear")][:6]
    assert names[-2:] == ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"]
    assert arch.units("linear")[3].params == 64 * 64 + 64  # out_proj with its bias
    assert arch.units("mlp")[0].width == {"channels": 128}


def test_llama_layout_is_recognised_whatever_the_class_name(llama):
    renamed = type("MyBrandNewForCausalLM", (type(llama),), {})
    llama.__class__ = renamed
    assert architecture(llama).family.name == "llama"


def test_unknown_architecture_names_the_supported_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(EvosearchError, match="unknown architecture GPT2LMHeadModel.*llama.*opt"):
        architecture(model)


def test_count_parameters_counts_tied_weights_once(llama):
    assert count_parameters(llama) == llama.num_parameters()
    llama.model.layers[0].mlp.down_proj.weight.zero_()
    assert count_parameters(llama, nonzero=True) == llama.num_parameters() - 64 * 128


@pytest.mark.real
def test_real_model_units(real):
    arch = architecture(real[0])
    assert len(arch.units("linear")) == 30 * 7
    assert arch.units("attention")[0].width == {"heads": 9, "kv_heads": 3, "head_dim": 64}
    assert arch.units("mlp")[0].width == {"channels": 1536}
