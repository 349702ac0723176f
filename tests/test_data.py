import json

import numpy as np
import pytest
import torch

from evosearch.data import Corpus, detokenize_brown, load_corpus, read_documents
from evosearch.errors import EvosearchError


class CharTokenizer:
    """A stand-in tokenizer: one id per byte, enough to test splitting and sampling."""

    name_or_path = "chars"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}

    def __len__(self):
        return 256

    def get_vocab(self):
        return {chr(i): i for i in range(256)}


def test_calibration_and_evaluation_never_overlap():
    corpus = Corpus("c", np.arange(10_000, dtype=np.int32))
    evaluation = corpus.evaluation_windows(1_000, 100).flatten()
    calibration = corpus.calibration_sequences(50, 100, seed=3).flatten()
    assert len(set(evaluation.tolist()) & set(calibration.tolist())) == 0
    assert evaluation.tolist() == list(range(1_000))  # in order, from the start


def test_calibration_is_seeded_and_windows_are_distinct():
    corpus = Corpus("c", np.arange(10_000, dtype=np.int32))
    a = corpus.calibration_sequences(20, 50, seed=1)
    assert torch.equal(a, corpus.calibration_sequences(20, 50, seed=1))
    assert not torch.equal(a, corpus.calibration_sequences(20, 50, seed=2))
    assert len(set(a[:, 0].tolist())) == 20
    assert all((row == torch.arange(row[0], row[0] + 50)).all() for row in a)  # contiguous windows


def test_sizes_that_do_not_fit_are_refused():
    corpus = Corpus("c", np.arange(1_000, dtype=np.int32))
    with pytest.raises(EvosearchError, match="calibration tokens"):
        corpus.calibration_sequences(100, 100)
    with pytest.raises(EvosearchError, match="evaluation tokens"):
        corpus.evaluation_windows(10_000, 100)
    with pytest.raises(EvosearchError, match="positive"):
        corpus.evaluation_windows(-1, 100)


def test_user_text_jsonl_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOSEARCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a.txt").write_text("hello world " * 50)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i} " * 20}) for i in range(5)))
    assert read_documents(tmp_path / "b.jsonl", text_field="body")[0].startswith("doc 0")
    assert len(read_documents(tmp_path, text_field="body")) == 6
    corpus = load_corpus(tmp_path / "a.txt", CharTokenizer())
    assert len(corpus.tokens) == len("hello world " * 50) - 1  # stripped
    assert len(corpus.evaluation) == int(len(corpus.tokens) * 0.2)


def test_bad_corpora_give_one_line_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    (tmp_path / "nofield.jsonl").write_text('{"content": "x"}\n')
    for path, message in [(tmp_path / "missing.txt", "does not exist"), (tmp_path / "empty.txt", "empty"),
                          (tmp_path / "bad.jsonl", "bad.jsonl:2 is not valid JSON"),
                          (tmp_path / "nofield.jsonl", "no string field 'text'")]:
        with pytest.raises(EvosearchError, match=message) as info:
            load_corpus(path, CharTokenizer())
        assert "\n" not in str(info.value)


def test_brown_detokenisation():
    raw = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc Atlanta's/np$ (/( it/pps )/) ./.\n\n"
    assert detokenize_brown(raw) == 'The jury said "no evidence", and Atlanta\'s (it).'


@pytest.mark.real
def test_brown_is_large_and_split(brown):
    assert len(brown.tokens) > 1_000_000
    assert len(brown.calibration) > 4 * len(brown.evaluation) - 10


def test_every_window_starts_with_the_bos_token_where_the_tokenizer_adds_one(tmp_path):
    """As lm-eval's rolling loglikelihood: a model whose tokenizer adds BOS sees it at the start of every
    window, evaluation and calibration alike; one whose tokenizer adds none (SmolLM2's) sees text only."""
    import tiny_checkpoint
    from transformers import AutoTokenizer

    from evosearch.data import load_corpus, text_prefix

    model_dir, text = tiny_checkpoint.save(tmp_path)
    plain = AutoTokenizer.from_pretrained(model_dir)
    assert text_prefix(plain) == ()
    bos = AutoTokenizer.from_pretrained(model_dir)
    bos.add_bos_token = True
    bos.bos_token = "<|endoftext|>"
    bos._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos.convert_tokens_to_ids("<|endoftext|>"))])
    prefix = text_prefix(bos)
    assert prefix == (bos.bos_token_id,)
    for tokenizer, expected in ((plain, ()), (bos, prefix)):
        corpus = load_corpus(text, tokenizer)
        assert corpus.prefix == expected
        windows = [corpus.evaluation_windows(256, 64), corpus.calibration_sequences(4, 64, seed=0)]
        for w in windows:
            assert w.shape[1] == 64
            assert (w[:, : len(expected)] == torch.tensor(expected, dtype=w.dtype)).all()
            assert bool((w[:, 0] == bos.bos_token_id).all()) == bool(expected)  # the text itself starts with none
        # consecutive evaluation windows continue the text where the last stopped, after the prefix
        ev = windows[0]
        step = 64 - len(expected)
        assert torch.equal(ev[1, len(expected):], torch.from_numpy(corpus.evaluation[step: 2 * step].astype("int64")))
