"""The layer-wise algorithms on the packaged SmolLM2-135M's real weights and activations."""

import pytest
import torch

from evosearch.database.hessian import Hessian, layer_error
from evosearch.database.quantization import GPTQ, QuantFormat, rtn_quantize
from evosearch.database.sparsity import SparseGPT, magnitude_prune
from evosearch.database.structured import group_scores, keep_mask, reform, reform_closed_form

pytestmark = pytest.mark.real

LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def first_block(real, brown):
    """{name: (W, Hessian)} for the linear layers of block 0 on 2048 tokens of Brown calibration text."""
    model = real[0]
    block = model.model.layers[0]
    modules = {name: block.get_submodule(name) for name in LAYERS}
    hessians = {name: Hessian(m.in_features) for name, m in modules.items()}
    hooks = [m.register_forward_pre_hook(lambda _, args, n=name: hessians[n].add_batch(args[0])) for name, m in modules.items()]

    def stop(*_):
        raise _Stop

    hooks.append(block.register_forward_hook(stop))  # block 0 is all we need
    ids = brown.calibration_sequences(8, 256, seed=0)
    with torch.no_grad(), pytest.raises(_Stop):
        model.model(ids)
    for hook in hooks:
        hook.remove()
    return {name: (m.weight.detach().clone(), hessians[name]) for name, m in modules.items()}


def test_sparsegpt_beats_magnitude_at_half_sparsity(first_block):
    for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        W, h = first_block[name]
        W_sparse = SparseGPT(W, h.H).prune(0.5)
        assert int((W_sparse == 0).sum()) >= W.numel() // 2, name  # the GGUF weights hold a few zeros already
        assert layer_error(W, W_sparse, h.H) < 0.7 * layer_error(W, magnitude_prune(W, 0.5), h.H), name


def test_gptq_beats_rtn_at_3_bits(first_block):
    # These weights are a dequantised 4-bit grid (GGUF Q4_1: groups of 32 with a float
    # minimum), so formats close to it say little; 3 bits with groups of 128 are not.
    fmt = QuantFormat(bits=3, group_size=128)
    for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        W, h = first_block[name]
        rtn = layer_error(W, rtn_quantize(W, fmt).dequantize(), h.H)
        assert layer_error(W, GPTQ(W, h.H).quantize(fmt).dequantize(), h.H) < 0.7 * rtn, name


def test_reformation_repairs_o_proj_after_removing_heads(first_block):
    W, h = first_block["self_attn.o_proj"]
    heads = torch.arange(576) // 64
    keep = keep_mask(group_scores(W, h.H, heads, axis=1), 6 / 9)[heads]
    W_hat, history = reform(W, h.H, keep)
    optimum = layer_error(W, reform_closed_form(W, h.H, keep, damp=0.01), h.H)
    assert (W_hat[:, ~keep] == 0).all()
    assert all(b <= a for a, b in zip(history, history[1:]))
    assert history[-1] < 0.1 * history[0]  # a large repair over merely deleting the heads
    assert layer_error(W, W_hat, h.H) < 1.2 * optimum
