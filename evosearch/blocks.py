"""Running a model block by block: what its first block receives, and one block's output.

The database builder, the fitness, reformation and healing all run decoder blocks one at a
time on cached inputs; this is the one place that knows how to get those inputs (run the
model up to its first block) and how to call a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evosearch.units import Architecture


@dataclass
class BlockInputs:
    """Hidden states entering a block, one tensor per calibration batch, and the keyword
    arguments the model passes to every block (attention mask, rotary embeddings...)."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]


class _StopForward(Exception):
    pass


@torch.inference_mode()
def capture_block_inputs(model, arch: Architecture, sequences: torch.Tensor, batch_size: int) -> BlockInputs:
    """Run the model up to its first block and keep what the block receives."""
    device = next(model.parameters()).device
    blocks = arch.blocks
    first = blocks[0]
    captured = BlockInputs([], [])

    class Catcher(torch.nn.Module):
        def forward(self, *args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured.hidden.append(hidden)
            captured.kwargs.append(kwargs)
            raise _StopForward

    blocks[0] = Catcher()
    try:
        for start in range(0, len(sequences), batch_size):
            try:
                model.base_model(input_ids=sequences[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        blocks[0] = first
    return captured


def run_block(block, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
