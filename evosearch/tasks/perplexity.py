"""Metrics of the ``evosearch_perplexity`` lm-eval task (loaded by lm-eval from the task YAML)."""

import re


def process_results(doc: dict, results: list[float]) -> dict:
    """lm-eval's word/byte perplexity and bits per byte, plus perplexity per token scored.

    Words and bytes are counted as lm-eval counts them for rolling log-likelihood tasks;
    ``doc["tokens"]`` is the number of tokens lm-eval scores in the document (evosearch
    counts them with the same tokenizer call when it writes the file).
    """
    (loglikelihood,) = results
    text = doc["text"]
    n_bytes = len(text.encode("utf-8"))
    return {
        "token_perplexity": (loglikelihood, doc["tokens"]),
        "word_perplexity": (loglikelihood, len(re.split(r"\s+", text))),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
