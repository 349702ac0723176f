"""Fitness for language-model candidates: KL divergence to the dense model (lower is better).

The fidelity of an evaluation is its number of calibration tokens: EvoPress's
multi-step selection scores many offspring on few tokens and the survivors on more.

The model runs block by block from cached inputs, so work that does not depend on the
candidate is done once:

- the embeddings and the keyword arguments every block receives (attention mask,
  rotary tables) are computed once per batch of calibration sequences;
- *prefix reuse*: a batch of candidates (a selection stage) is scored against a
  reference, the level each unit takes in most of the batch (for EvoPress offspring,
  their parent). The reference runs once and keeps each block's input; a candidate then
  starts at the first block where it differs from the reference. Offspring that change
  two or three units skip, on average, a third to a half of the model.

Both are exact: the same arithmetic runs on the same inputs, only fewer times.
"""

from __future__ import annotations

from collections import Counter

import torch

from evosearch.candidate import CandidateModel
from evosearch.database.build import capture_block_inputs, run_block
from evosearch.evaluate import ROWS_PER_CHUNK, Teacher, default_batch_size, logits_from_hidden


class KLFitness:
    def __init__(self, candidate: CandidateModel, teacher: Teacher, batch_size: int | None = None,
                 reuse_prefix: bool = True, compile_blocks: bool = False):
        self.candidate = candidate
        self.teacher = teacher
        self.model = candidate.model
        self.arch = candidate.arch
        self.batch_size = batch_size or default_batch_size(self.model)
        self.reuse_prefix = reuse_prefix
        # torch.compile fuses a block's norms, rotary and activations; weights are swapped in place, so
        # the compiled code stays valid for every candidate.
        self._run_block = torch.compile(run_block, dynamic=False) if compile_blocks else run_block
        self.fidelities: list[int] | None = None  # set by the caller for multi-step selection
        self._block_of = {u: mu.block for u, mu in candidate.problem.model_units.items()}
        self._inputs: dict[int, tuple[torch.Tensor, dict]] = {}  # batch start -> (block-0 input, block kwargs)
        self._reference: tuple[dict, int, dict[int, list[torch.Tensor]]] | None = None

    @property
    def max_fidelity(self) -> int:
        return self.teacher.max_tokens

    def __call__(self, assignment: dict, fidelity: int | None = None) -> float:
        return self.evaluate_batch([assignment], fidelity)[0]

    @torch.inference_mode()
    def evaluate_batch(self, assignments: list[dict], fidelity: int | None = None) -> list[float]:
        """KL of each assignment on the first ``fidelity`` calibration tokens (whole sequences)."""
        n_sequences = self._sequences(fidelity)
        first_block = [0] * len(assignments)
        if self.reuse_prefix and len(assignments) > 1:
            reference = self._ensure_reference(assignments, n_sequences)
            first_block = [self._first_difference(a, reference) for a in assignments]
        values = []
        for assignment, start in zip(assignments, first_block):
            self.candidate.apply(assignment)
            values.append(self._kl(n_sequences, start))
        return values

    def _sequences(self, tokens: int | None) -> int:
        length = self.teacher.sequence_length
        n = len(self.teacher.sequences) if tokens is None else -(-tokens // length)
        return min(n, len(self.teacher.sequences))

    def _batches(self, n_sequences: int) -> range:
        return range(0, n_sequences, self.batch_size)

    def _block_inputs(self, start: int, stop: int) -> tuple[torch.Tensor, dict]:
        """Embeddings and block arguments for sequences [start, stop), computed once."""
        key = (start, stop)
        if key not in self._inputs:
            captured = capture_block_inputs(self.model, self.arch, self.teacher.sequences[start:stop],
                                            batch_size=stop - start)
            self._inputs[key] = (captured.hidden[0], captured.kwargs[0])
        return self._inputs[key]

    def _kl(self, n_sequences: int, start_block: int) -> float:
        """Run blocks ``start_block``.. on every batch (from the reference's cached inputs when
        ``start_block`` > 0), then the head, and sum KL(teacher || model) in row chunks."""
        device = self.candidate.device
        total = torch.zeros((), device=device, dtype=torch.float64)
        blocks = self.arch.blocks
        for i, start in enumerate(self._batches(n_sequences)):
            stop = min(start + self.batch_size, n_sequences)
            hidden, kwargs = self._block_inputs(start, stop)
            if start_block > 0:
                hidden = self._reference[2][start_block][i]
            for b in range(start_block, len(blocks)):
                hidden = self._run_block(blocks[b], hidden, kwargs)
            total += self._head_kl(hidden, start)
        return total.item() / (n_sequences * self.teacher.sequence_length)

    def _head_kl(self, hidden: torch.Tensor, first_sequence: int) -> torch.Tensor:
        hidden = self.arch.finish(hidden).reshape(-1, hidden.shape[-1])
        offset = first_sequence * self.teacher.sequence_length
        total = torch.zeros((), device=hidden.device, dtype=torch.float64)
        for rows in range(0, len(hidden), ROWS_PER_CHUNK):
            student = logits_from_hidden(self.model, hidden[rows : rows + ROWS_PER_CHUNK], upcast=False)
            total += self.teacher.chunk_kl(slice(offset + rows, offset + rows + len(student)), student)
        return total

    def _ensure_reference(self, assignments: list[dict], n_sequences: int) -> dict:
        """The batch's consensus assignment, with every block's input cached for ``n_sequences``."""
        reference = {unit: Counter(a[unit] for a in assignments).most_common(1)[0][0] for unit in assignments[0]}
        # The same sequences in the same batches, so a candidate's prefix is bit-identical to its own full run.
        if self._reference is not None and self._reference[:2] == (reference, n_sequences):
            return reference
        self.candidate.apply(reference)
        depth = len(self.arch.blocks)
        cached: dict[int, list[torch.Tensor]] = {b: [] for b in range(depth + 1)}  # input of block b; depth: output
        for start in self._batches(n_sequences):
            hidden, kwargs = self._block_inputs(start, min(start + self.batch_size, n_sequences))
            for b, block in enumerate(self.arch.blocks):
                cached[b].append(hidden)
                hidden = self._run_block(block, hidden, kwargs)
            cached[depth].append(hidden)
        self._reference = (reference, n_sequences, cached)
        return reference

    def _first_difference(self, assignment: dict, reference: dict) -> int:
        """The first block whose units differ from the reference (the depth when none do)."""
        changed = [self._block_of[u] for u, level in assignment.items() if reference[u] != level]
        return min(changed, default=len(self.arch.blocks))
