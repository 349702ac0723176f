"""Quality metrics: perplexity on held-out text, and KL divergence to the dense model.

Both run the model's body once per batch of windows and apply the output head to
chunks of rows, so the (tokens x vocabulary) logits never exist all at once: memory
stays bounded for large vocabularies and long calibration sets.

The KL divergence KL(teacher || student) is averaged over every position of the
calibration sequences. The teacher's (dense model's) next-token log-probabilities are
computed once per calibration set and kept, in full (float32 by default; float16 halves
the memory at a relative error near 1e-2 on small KL values) or as the top-k entries
plus the remaining tail mass. With top-k, the KL is that of the two distributions
coarsened to (k tokens, everything else): a lower bound on the full KL that is exact
when the teacher puts no mass outside its top k.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from evosearch.kernels import kl as kl_kernels
from evosearch.kernels.kl import kl_divergence_reference as kl_divergence  # noqa: F401 (the PyTorch references)
from evosearch.kernels.kl import kl_divergence_topk_reference as kl_divergence_topk  # noqa: F401

log = logging.getLogger("evosearch")

ROWS_PER_CHUNK = 2048  # rows of logits alive at once: 2048 x 49152 fp32 = 400 MB


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    loss: float  # mean next-token cross-entropy, nats
    tokens: int  # predicted tokens
    bits_per_byte: float | None = None


def hidden_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The final hidden states (after the last norm) for a batch of token windows."""
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


def logits_from_hidden(model, hidden: torch.Tensor, *, upcast: bool = True) -> torch.Tensor:
    """Apply the output head (and any logit scaling the architecture defines), in float32.

    With ``upcast=False`` and no scaling to apply, the head's output keeps its own dtype
    (bfloat16 on a GPU): the KL functions upcast as they read, so they see the same values
    without a float32 copy of the logits being written and read.
    """
    logits = model.get_output_embeddings()(hidden)
    scale = getattr(model.config, "logit_scale", None)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if upcast or scale or cap:
        logits = logits.float()
    if scale:
        logits = logits * scale
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def default_batch_size(model) -> int:
    return 8 if next(model.parameters()).device.type == "cuda" else 1


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, *, tokenizer=None, batch_size: int | None = None,
               progress: bool = True) -> Perplexity:
    """Perplexity over non-overlapping windows (each predicts its own tokens 2..L).

    With a tokenizer, also bits per byte of the predicted text (comparable across tokenizers).
    """
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(model)
    total_loss, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch",
                      disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        hidden = hidden_states(model, batch)[:, :-1].reshape(-1, hidden_size(model))
        targets = batch[:, 1:].reshape(-1)
        for rows in range(0, len(targets), ROWS_PER_CHUNK):
            logits = logits_from_hidden(model, hidden[rows : rows + ROWS_PER_CHUNK])
            total_loss += F.cross_entropy(logits, targets[rows : rows + ROWS_PER_CHUNK], reduction="sum").item()
        total_tokens += targets.numel()
    loss = total_loss / total_tokens
    bpb = None
    if tokenizer is not None:
        n_bytes = sum(len(tokenizer.decode(w[1:]).encode("utf-8")) for w in windows.tolist())
        bpb = total_loss / math.log(2) / n_bytes
    return Perplexity(perplexity=math.exp(loss), loss=loss, tokens=total_tokens, bits_per_byte=bpb)


def hidden_size(model) -> int:
    return model.get_output_embeddings().in_features


class Teacher:
    """The dense model's next-token distributions on fixed calibration sequences.

    Built once (``Teacher.build``) and reused for every candidate: ``kl(model, tokens)``
    runs the candidate on the first ``tokens`` calibration tokens (whole sequences) and
    returns the mean KL(teacher || candidate) per token in nats.
    """

    def __init__(self, sequences: torch.Tensor, logprobs: torch.Tensor | None = None,
                 top_logprobs: torch.Tensor | None = None, top_indices: torch.Tensor | None = None,
                 tail_logprob: torch.Tensor | None = None):
        self.sequences = sequences  # (n, L) int64
        self.logprobs = logprobs  # (n*L, V), or None in top-k mode
        self.top_logprobs = top_logprobs  # (n*L, k) float32
        self.top_indices = top_indices  # (n*L, k) int32
        self.tail_logprob = tail_logprob  # (n*L,) float32: log of the mass outside the top k

    @property
    def top_k(self) -> int | None:
        return None if self.top_indices is None else self.top_indices.shape[1]

    @property
    def max_tokens(self) -> int:
        return self.sequences.numel()

    @property
    def sequence_length(self) -> int:
        return self.sequences.shape[1]

    @staticmethod
    def storage_bytes(tokens: int, vocab: int, top_k: int | None = None) -> int:
        """What ``build`` keeps for ``tokens`` positions (in float32): every log-probability, or the
        top k of them with their int32 indices and the tail's log-mass."""
        return tokens * vocab * 4 if top_k is None else tokens * (top_k * (4 + 4) + 4)

    @classmethod
    @torch.inference_mode()
    def build(cls, model, sequences: torch.Tensor, *, top_k: int | None = None, batch_size: int | None = None,
              storage_device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
              progress: bool = True) -> "Teacher":
        """Run the dense ``model`` on ``sequences`` and keep its log-probabilities on ``storage_device``."""
        device = next(model.parameters()).device
        storage_device = torch.device(storage_device) if storage_device is not None else device
        batch_size = batch_size or default_batch_size(model)
        # The full log-probabilities are written into one tensor: chunks and their concatenation
        # would need twice its memory at the end.
        logprobs = None if top_k is not None else torch.empty(
            sequences.numel(), model.get_output_embeddings().weight.shape[0], dtype=dtype, device=storage_device)
        chunks: list[tuple[torch.Tensor, ...]] = []
        row = 0
        for start in tqdm(range(0, len(sequences), batch_size), desc="teacher", unit="batch",
                          disable=not progress, leave=False):
            hidden = hidden_states(model, sequences[start : start + batch_size].to(device))
            hidden = hidden.reshape(-1, hidden.shape[-1])
            for rows in range(0, len(hidden), ROWS_PER_CHUNK):
                logp = torch.log_softmax(logits_from_hidden(model, hidden[rows : rows + ROWS_PER_CHUNK]), dim=-1)
                if top_k is None:
                    logprobs[row : row + len(logp)] = logp
                    row += len(logp)
                else:
                    values, indices = logp.topk(top_k, dim=-1)
                    tail = torch.logsumexp(logp.scatter(-1, indices, float("-inf")), dim=-1)
                    chunks.append((values, indices.to(torch.int32), tail))
        if top_k is None:
            return cls(sequences, logprobs=logprobs)
        values, indices, tail = (torch.cat([c[i] for c in chunks]).to(storage_device) for i in range(3))
        return cls(sequences, top_logprobs=values, top_indices=indices, tail_logprob=tail)

    @torch.inference_mode()
    def kl(self, model, tokens: int | None = None, *, batch_size: int | None = None) -> float:
        """Mean KL(teacher || model) per token over the first ``tokens`` calibration tokens."""
        device = next(model.parameters()).device
        n_sequences = len(self.sequences) if tokens is None else -(-tokens // self.sequence_length)
        n_sequences = min(n_sequences, len(self.sequences))
        batch_size = batch_size or default_batch_size(model)
        total = torch.zeros((), device=device, dtype=torch.float64)
        for start in range(0, n_sequences, batch_size):
            stop = min(start + batch_size, n_sequences)
            hidden = hidden_states(model, self.sequences[start:stop].to(device))
            hidden = hidden.reshape(-1, hidden.shape[-1])
            offset = start * self.sequence_length
            for rows in range(0, len(hidden), ROWS_PER_CHUNK):
                student = logits_from_hidden(model, hidden[rows : rows + ROWS_PER_CHUNK], upcast=False)
                total += self.chunk_kl(slice(offset + rows, offset + rows + len(student)), student)
        return total.item() / (n_sequences * self.sequence_length)

    def chunk_kl(self, rows: slice, student_logits: torch.Tensor) -> torch.Tensor:
        """Sum of KL(teacher || student) over calibration positions ``rows`` (flattened (sequence, position))."""
        device = student_logits.device
        if self.top_k is None:
            return kl_kernels.kl_divergence(self.logprobs[rows].to(device), student_logits)
        return kl_kernels.kl_divergence_topk(self.top_logprobs[rows].to(device), self.top_indices[rows].to(device),
                                             self.tail_logprob[rows].to(device), student_logits)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {"sequences": self.sequences}
        if self.top_k is None:
            tensors["logprobs"] = self.logprobs
        else:
            tensors |= {"top_logprobs": self.top_logprobs, "top_indices": self.top_indices,
                        "tail_logprob": self.tail_logprob}
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Teacher":
        from safetensors.torch import load_file

        return cls(**load_file(str(path), device=str(device)))
