"""A tiny random Llama saved as a Hugging Face directory, with its own small tokenizer and text.

For tests of whole runs (search, show, report, lm-eval) that load a model from disk: no
packaged asset is needed, and with a vocabulary of a few hundred tokens every forward
pass and KL divergence is cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her all she there would their we him been has when who will more no if out so said what up "
         "its about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little state good very make world still own "
         "see men work long get here between both life being under never day same another know while last might us "
         "great old year off come since against go came right used take three").split()


def text(n_words: int = 12000, seed: int = 0) -> str:
    """Zipf-distributed words in sentences and paragraphs: something with the statistics of text."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, len(WORDS) + 1)
    words = rng.choice(WORDS, size=n_words, p=(1 / ranks) / (1 / ranks).sum())
    sentences, start = [], 0
    while start < n_words:
        stop = start + int(rng.integers(6, 18))
        sentence = " ".join(words[start:stop])
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        start = stop
    paragraphs = [" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5)]
    return "\n\n".join(paragraphs) + "\n"


def save(folder: Path, layers: int = 2, vocab_size: int = 320) -> tuple[Path, Path]:
    """Write ``folder/model`` (config, weights, tokenizer) and ``folder/text.txt``; return both paths."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = text()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=0, bos_token_id=0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "text.txt").write_text(corpus)
    return folder / "model", folder / "text.txt"
