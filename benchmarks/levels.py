"""The sparsity space's levels per layer type, for two spacings, at 50% and 70%: how far each layer can move.

    python benchmarks/levels.py              # SmolLM2-135M and Llama-3-8B shapes; a markdown table

Shapes only (models on the meta device): nothing is loaded or computed. A row gives, per layer
type, the number of levels and the sparsities of the densest and sparsest one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from evosearch.compression import CompressionSpace  # noqa: E402
from evosearch.kinds.sparsity import AroundTarget  # noqa: E402
from evosearch.units import architecture  # noqa: E402

SHAPES = {
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
}
SPACINGS = {"mean_layer (4 x 10% of the mean layer)": AroundTarget(steps=4, step=0.1),
            "evopress (8 x 0.5 min(t, 1-t)/8 hidden^2)": AroundTarget(steps=8, spacing="evopress")}
LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main() -> None:
    base = CompressionSpace.load("sparsity")
    print("| shape | spacing | target | " + " | ".join(LAYERS) + " |")
    print("|" + " --- |" * (3 + len(LAYERS)))
    for shape, sizes in SHAPES.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, vocab_size=1000, **sizes))
        arch = architecture(model)
        for spacing, levels in SPACINGS.items():
            spec = base.model_copy(update={"compression": base.compression.model_copy(update={"levels": levels})})
            for target in (0.5, 0.7):
                units = {u.name.rsplit(".", 1)[1]: u for u in spec.materialize(arch, target).space.units}
                cells = [f"{len(units[n].levels)}: {min(units[n].resources['sparsity']):.2f}-"
                         f"{max(units[n].resources['sparsity']):.2f}" for n in LAYERS]
                print(f"| {shape} | {spacing} | {target:.0%} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
