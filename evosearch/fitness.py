"""Fitness for language-model candidates: KL divergence to the dense model (lower is better).

The fidelity of an evaluation is its number of calibration tokens: EvoPress's
multi-step selection scores many offspring on few tokens and the survivors on more.

The model runs block by block from cached inputs, so work that does not depend on the
candidate is done once:

- the embeddings and the keyword arguments every block receives (attention mask,
  rotary tables) are computed once per batch of calibration sequences;
- *prefix reuse*: a batch of candidates (a selection stage) is scored against a
  reference, the level each unit takes in most of the batch (for EvoPress offspring,
  their parent). The reference runs once and keeps each block's input, up to the latest
  block where a candidate of the batch first differs from it (a later batch with the same
  reference extends that run if it needs to); a candidate then starts at its own first
  difference. Offspring that change two or three units skip, on average, a third to a half
  of the model.

Both are exact: the same arithmetic runs on the same inputs, only fewer times.

On a GPU two more things cut the cost of a candidate without changing its value:

- *CUDA graphs*: the run of blocks ``s``.. plus the head and the KL of one batch is
  captured once per (batch, s) and then replayed. Weights are swapped in place, the
  reference's block inputs live in fixed buffers, so every captured address stays valid
  across candidates and generations. At a few thousand tokens a candidate is otherwise
  bound by the ~20 kernel launches per block from Python, not by the GPU;
- ``compile_blocks``: ``torch.compile`` of a block fuses its norms, rotary embedding,
  activation and residual adds, which read and write the (tokens x hidden) activations
  many times in eager mode. One compiled graph serves every block of the same shape.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from evosearch.candidate import CandidateModel
from evosearch.blocks import capture_block_inputs, run_block
from evosearch.evaluate import ROWS_PER_CHUNK, Teacher, default_batch_size, logits_from_hidden

log = logging.getLogger("evosearch")

GPU_LOGIT_BYTES = 2**30


class KLFitness:
    def __init__(self, candidate: CandidateModel, teacher: Teacher, batch_size: int | None = None,
                 reuse_prefix: bool = True, compile_blocks: bool = False, cuda_graphs: bool | None = None,
                 compile_mode: str | None = None, fidelities: list[int] | None = None):
        """``fidelities``: the calibration token counts of multi-step selection (None: one fidelity, all
        the teacher's tokens). ``cuda_graphs``: None captures them where they can run (model and teacher
        on a GPU). ``compile_mode``: ``torch.compile``'s mode for the compiled blocks (None: its default)."""
        self.candidate = candidate
        self.teacher = teacher
        self.model = candidate.model
        self.arch = candidate.arch
        self.batch_size = batch_size or default_batch_size(self.model)
        self.reuse_prefix = reuse_prefix
        self._run_block = _compiled(run_block, compile_mode) if compile_blocks else run_block
        self._finish = _compiled(self.arch.finish, compile_mode) if compile_blocks else self.arch.finish
        graphs_possible = candidate.device.type == "cuda" and _teacher_device(teacher) == candidate.device
        if cuda_graphs and not graphs_possible:
            log.info("CUDA graphs need the model and the teacher on one GPU: running without them")
        self.cuda_graphs = graphs_possible if cuda_graphs is None else bool(cuda_graphs) and graphs_possible
        self.fidelities = None if fidelities is None else sorted(fidelities)  # the engine's Fitness protocol
        # Rows of logits per head-and-KL step: on a GPU up to 1 GiB of them (fewer, larger kernels:
        # 6% faster than 2,048 rows on the H200), elsewhere ROWS_PER_CHUNK.
        vocab = self.model.get_output_embeddings().weight.shape[0]
        itemsize = next(self.model.parameters()).element_size()
        self._rows_per_chunk = (max(ROWS_PER_CHUNK, GPU_LOGIT_BYTES // (vocab * itemsize))
                                if candidate.device.type == "cuda" else ROWS_PER_CHUNK)
        self._block_of = {u: mu.block for u, mu in candidate.problem.model_units.items()}
        self._inputs: dict[tuple[int, int], tuple[torch.Tensor, dict]] = {}  # batch -> (block-0 input, kwargs)
        # The reference run's input of every block (and the last block's output), per batch, in buffers
        # that are written in place when the reference changes: captured graphs read them.
        self._prefix: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._reference: tuple[dict, int, int] | None = None  # (assignment, sequences, blocks run)
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._warmed: set[tuple[int, int, int]] = set()
        self._graph_pool = None

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
            reference = {unit: Counter(a[unit] for a in assignments).most_common(1)[0][0] for unit in assignments[0]}
            first_block = [self._first_difference(a, reference) for a in assignments]
            self._ensure_reference(reference, n_sequences, depth=max(first_block))
        # The sums stay on the device until all are queued: one transfer for the batch, not a
        # host round trip per candidate (the swaps are ordered after the previous run on the stream).
        totals = []
        for assignment, start in zip(assignments, first_block):
            self.candidate.apply(assignment)
            totals.append(self._kl(n_sequences, start))
        tokens = n_sequences * self.teacher.sequence_length
        return [total / tokens for total in torch.stack(totals).tolist()]

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

    def _kl(self, n_sequences: int, start_block: int) -> torch.Tensor:
        """Summed KL over the first ``n_sequences`` sequences (a float64 scalar on the device), running
        blocks ``start_block``.. (from the reference's cached inputs when ``start_block`` > 0)."""
        total = torch.zeros((), device=self.candidate.device, dtype=torch.float64)  # not a graph's output buffer
        for start in self._batches(n_sequences):
            total += self._batch_kl(start, min(start + self.batch_size, n_sequences), start_block)
        return total

    def _batch_kl(self, start: int, stop: int, start_block: int) -> torch.Tensor:
        """Summed KL on sequences [start, stop): by replaying a CUDA graph where one is captured.

        A (batch, start block) runs eagerly the first time (which also warms up cuBLAS, Triton
        and any compiled code) and is captured the second time, when it has proved to recur."""
        key = (start, stop, start_block)
        if key in self._graphs:
            graph, total = self._graphs[key]
            graph.replay()
            return total
        if not self.cuda_graphs or key not in self._warmed:
            self._warmed.add(key)
            return self._run_suffix(start, stop, start_block)
        return self._capture(key)

    def _run_suffix(self, start: int, stop: int, start_block: int) -> torch.Tensor:
        blocks = self.arch.blocks
        hidden, kwargs = self._block_inputs(start, stop)
        if start_block > 0:
            hidden = self._prefix[start, stop][start_block]
        for b in range(start_block, len(blocks)):
            hidden = self._run_block(blocks[b], hidden, kwargs)
        return self._head_kl(hidden, start)

    def _capture(self, key: tuple[int, int, int]) -> torch.Tensor:
        """Capture the run of ``key`` into a CUDA graph (all graphs share one memory pool: they
        never run concurrently, and each keeps only its scalar output), and replay it."""
        try:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                total = self._run_suffix(*key)
        except Exception as exc:  # an operation that cannot be captured: stay correct, just slower
            log.warning("CUDA graph capture failed (%s: %s); the fitness runs without CUDA graphs",
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            self.cuda_graphs = False
            return self._run_suffix(*key)
        self._graphs[key] = graph, total
        graph.replay()
        return total

    def _head_kl(self, hidden: torch.Tensor, first_sequence: int) -> torch.Tensor:
        hidden = self._finish(hidden).reshape(-1, hidden.shape[-1])
        offset = first_sequence * self.teacher.sequence_length
        total = torch.zeros((), device=hidden.device, dtype=torch.float64)
        chunk = self._rows_per_chunk
        for rows in range(0, len(hidden), chunk):
            student = logits_from_hidden(self.model, hidden[rows : rows + chunk], upcast=False)
            total += self.teacher.chunk_kl(slice(offset + rows, offset + rows + len(student)), student)
        return total

    def _ensure_reference(self, reference: dict, n_sequences: int, depth: int) -> None:
        """Cache the inputs of the reference's blocks up to block ``depth`` (the output of the last
        block when ``depth`` is the number of blocks) for the first ``n_sequences`` sequences. Blocks
        after the latest first difference in a batch are never read, so they are not run."""
        # The same sequences in the same batches, so a candidate's prefix is bit-identical to its own full run.
        done = 0
        if self._reference is not None and self._reference[:2] == (reference, n_sequences):
            done = self._reference[2]
        if depth <= done:
            return
        self.candidate.apply(reference)
        blocks = self.arch.blocks
        for start in self._batches(n_sequences):
            stop = min(start + self.batch_size, n_sequences)
            hidden, kwargs = self._block_inputs(start, stop)
            if (start, stop) not in self._prefix:  # index 0 is the block-0 input itself, which never changes
                self._prefix[start, stop] = [hidden] + [torch.empty_like(hidden) for _ in blocks]
            buffers = self._prefix[start, stop]
            hidden = buffers[done]
            for b in range(done, depth):
                hidden = self._run_block(blocks[b], hidden, kwargs)
                buffers[b + 1].copy_(hidden)
        self._reference = (reference, n_sequences, depth)

    def _first_difference(self, assignment: dict, reference: dict) -> int:
        """The first block whose units differ from the reference (the depth when none do)."""
        changed = [self._block_of[u] for u, level in assignment.items() if reference[u] != level]
        return min(changed, default=len(self.arch.blocks))


def _teacher_device(teacher: Teacher) -> torch.device:
    stored = teacher.logprobs if teacher.logprobs is not None else teacher.top_logprobs
    return stored.device


def _compiled(fn, mode: str | None = None):
    """``torch.compile(fn)``, falling back to ``fn`` (with a warning) if compiling fails."""
    compiled = torch.compile(fn, dynamic=False, mode=mode)
    state = {"fn": compiled}

    def run(*args):
        try:
            return state["fn"](*args)
        except Exception as exc:
            if state["fn"] is fn:
                raise
            log.warning("torch.compile of the blocks failed (%s: %s); running them eagerly",
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            state["fn"] = fn
            return fn(*args)

    return run
