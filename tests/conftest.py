"""Shared fixtures (tiny random models built in-process, the packaged real model), and the GPU switches.

Tests marked ``gpu`` are skipped without a CUDA device; without one, Triton kernels run in
Triton's CPU interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, Triton kernels run in Triton's interpreter on the CPU; the switch is read
# when a kernel is defined, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def tiny_llama(layers: int = 2, seed: int = 0, **overrides):
    """A random Llama-family model small enough for every test (GQA: 4 query, 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=True) | overrides
    return LlamaForCausalLM(LlamaConfig(**settings)).eval().requires_grad_(False)


def tiny_opt(layers: int = 2, seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=layers,
                       num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256)
    return OPTForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def opt():
    return tiny_opt()


@pytest.fixture(scope="session")
def real():
    """The packaged SmolLM2-135M model with its tokenizer (fetched and converted once per machine)."""
    from evosearch.model import load_model

    return load_model(None, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real):
    """A tiny random Llama saved with the packaged model's tokenizer: a user's own model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = real[1]
    tiny_llama(layers=2, vocab_size=len(tokenizer), max_position_embeddings=2048).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def brown(real):
    from evosearch.data import load_corpus

    return load_corpus("brown", real[1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model and its text saved as a user's would be (``tiny_checkpoint.save``), with a
    cache of its own (databases, tokens, dense perplexity) for the module's tests."""
    import tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoint")
    model, corpus = tiny_checkpoint.save(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EVOSEARCH_CACHE", str(root / "cache"))
        yield model, corpus
