"""Bad input, tried as a new user would: one line, exit status 2, before anything is built.

Every case runs on the tiny checkpoint (2 blocks, 4 drop units, vocabulary 320, context 1024).
"""

from __future__ import annotations

import pytest

from evosearch.cli import main
from evosearch.pipeline import SearchSettings


def test_eval_refuses_a_window_beyond_the_model_context(checkpoint, capsys):
    model, corpus = checkpoint  # max_position_embeddings 1024: rotary positions run past it without an error
    assert main(["eval", "--model", str(model), "--corpus", str(corpus), "--tokens", "2048", "--window", "2048"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "evosearch: error: --window 2048 exceeds the model's context of 1024 tokens (max_position_embeddings); "
        "lower --window to at most 1024")


def test_eval_refuses_a_tokenizer_beyond_the_model_vocabulary(checkpoint, tmp_path, capsys):
    """A model of 100 entries saved with the checkpoint's tokenizer of 320: the embedding lookup would fail."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    model, corpus = checkpoint
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(model).save_pretrained(tmp_path)
    assert main(["eval", "--model", str(tmp_path), "--corpus", str(corpus), "--tokens", "512"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"evosearch: error: the tokenizer of --model gives --corpus {corpus} token ids up to 3")
    assert err[-1].endswith("but the model's vocabulary has 100 entries; save the model with the tokenizer it was "
                            "trained with")
    assert not any("Traceback" in line for line in err)


def test_heal_refuses_a_sequence_length_beyond_the_model_context(checkpoint, tmp_path, capsys):
    import json
    import shutil

    model, corpus = checkpoint
    shutil.copytree(model, tmp_path / "model")
    settings = SearchSettings(budget=0.5, model=str(model), corpus=str(corpus), sequence_length=64, fidelities=[64])
    (tmp_path / "result.json").write_text(json.dumps({"settings": settings.model_dump()}))
    assert main(["heal", str(tmp_path), "--tokens", "4096", "--sequence-length", "2048"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "evosearch: error: --sequence-length 2048 exceeds the model's context of 1024 tokens "
        "(max_position_embeddings); lower --sequence-length to at most 1024")
