"""Sub-networks: which heads and MLP channels each block keeps, the reformation of the
kept weights, and the slicing of the model down to them for export.

Granularity. An attention block keeps whole key/value *groups*: one KV head and the
query heads that share it (SmolLM2-135M: 3 groups of 1 KV and 3 query heads; without
GQA a group is one head). A KV head is needed while any of its query heads is, so the
parameters of single query heads do not add up, and a layer with unequal numbers of
query heads per KV head is no GQA layer a standard kernel runs. With whole groups every
sub-network is a plain GQA layer with the source model's ratio, the budget's count is
a sum over blocks, and the KV cache shrinks with the attention. An MLP keeps single
channels; the space's granularity only sets the step between its levels.

Importance, the paper's mask initialisation. A group's score is the sum of the OBS
saliencies W_ij^2 / [H^-1]_jj (``structured.group_scores``) of all its weights: its rows
of q/k/v_proj (gate/up_proj) with the Hessian of the block's input, and its columns of
o_proj (down_proj) with the Hessian of theirs. A block at width k keeps its k
highest-scoring groups, so a block's masks are nested.

In memory a pruned group's rows of the input projections and its columns of the output
projection are zero. Only the columns matter to the output (a head whose o_proj columns
are zero adds nothing, whatever its q/k/v rows hold), so the widths of a model in
memory are read from its output projections (``kept_groups``): that is what the budget
is checked against and what export keeps.

Export. ``slice_to_kept`` removes the pruned rows and columns from the layers, and
``evosearch.export`` writes the result: blocks of unlike sizes get evosearch's Llama with
per-block overrides (``modeling_evosearch.py`` beside the weights). vLLM has no class for
this: its nearest, ``DeciLMForCausalLM`` (Nemotron-NAS ``block_configs``), takes per-block
KV-head counts, MLP sizes (``ffn.intermediate_size``) and removed (``no_op``) attention or
MLP blocks, but one query-head count for all blocks, so it could serve a sub-network that
pruned channels and dropped blocks but kept every head; one with pruned heads needs a vLLM
model class like evosearch's.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from evosearch.blocks import capture_block_inputs, run_block
from evosearch.database.hessian import Hessian, layer_error
from evosearch.database.structured import group_scores, reform, reform_closed_form
from evosearch.errors import EvosearchError
from evosearch.units import Architecture, ModelUnit

log = logging.getLogger("evosearch")


@dataclass(frozen=True)
class Layout:
    """How a unit's groups (KV groups or channels) map onto its layers' rows and columns."""

    groups: int
    inputs: tuple[str, ...]  # q/k/v or gate/up (fc1): one row block per group
    rows: dict[str, int]  # rows per group of each input layer
    output: str  # o_proj or down_proj (fc2): one column block per group
    columns: int  # columns per group of the output layer


def layout(arch: Architecture, mu: ModelUnit) -> Layout:
    if mu.kind == "attention":
        heads, kv_heads, head_dim = mu.width["heads"], mu.width["kv_heads"], mu.width["head_dim"]
        inputs, output = arch.attention_linears(mu.block)
        per_group = heads // kv_heads * head_dim
        rows = {name: per_group if arch.module(name).out_features == heads * head_dim else head_dim
                for name in inputs}
        return Layout(kv_heads, tuple(inputs), rows, output, per_group)
    if mu.kind == "mlp":
        inputs, output = arch.mlp_linears(mu.block)
        return Layout(mu.width["channels"], tuple(inputs), {name: 1 for name in inputs}, output, 1)
    raise ValueError(f"unit {mu.name} is a {mu.kind}; sub-networks are made of attention and mlp units")


def importance(arch: Architecture, mu: ModelUnit, hessians: dict[str, torch.Tensor],
               damp: float = 0.01) -> torch.Tensor:
    """The paper's score of each group: summed OBS saliencies of its rows and columns."""
    lay = layout(arch, mu)
    scores = torch.zeros(lay.groups, device=arch.module(lay.output).weight.device)
    for name in lay.inputs:
        W = arch.module(name).weight
        scores += group_scores(W, hessians[name], torch.arange(W.shape[0]) // lay.rows[name], axis=0, damp=damp)
    W = arch.module(lay.output).weight
    scores += group_scores(W, hessians[lay.output], torch.arange(W.shape[1]) // lay.columns, axis=1, damp=damp)
    return scores


def importance_order(scores: torch.Tensor) -> torch.Tensor:
    """Groups from most to least important; a width of k keeps the first k."""
    return torch.argsort(scores, descending=True, stable=True)


def kept_by_order(order: torch.Tensor, keep: int) -> torch.Tensor:
    kept = torch.zeros(len(order), dtype=torch.bool, device=order.device)
    kept[order[:keep]] = True
    return kept


def masked(lay: Layout, kept: torch.Tensor, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The unit's parameters (``dense``, by parameter name) with the pruned groups zeroed.

    Rows of the input layers (weights and biases) and columns of the output layer; the
    output layer's bias stays unless every group is pruned (the block is dropped).
    """
    out = {}
    for name in lay.inputs:
        rows = kept.repeat_interleave(lay.rows[name]).to(dense[f"{name}.weight"].device)
        out[f"{name}.weight"] = dense[f"{name}.weight"] * rows[:, None]
        if f"{name}.bias" in dense:
            out[f"{name}.bias"] = dense[f"{name}.bias"] * rows
    columns = kept.repeat_interleave(lay.columns).to(dense[f"{lay.output}.weight"].device)
    out[f"{lay.output}.weight"] = dense[f"{lay.output}.weight"] * columns[None, :]
    if f"{lay.output}.bias" in dense:
        out[f"{lay.output}.bias"] = dense[f"{lay.output}.bias"] * bool(kept.any())
    return out


def unit_parameters(arch: Architecture, mu: ModelUnit, keep: int) -> int:
    """Parameters the unit holds with ``keep`` groups: what export keeps of it."""
    lay = layout(arch, mu)
    total = 0
    for name in lay.inputs:
        layer = arch.module(name)
        rows = keep * lay.rows[name]
        total += rows * layer.in_features + (rows if layer.bias is not None else 0)
    layer = arch.module(lay.output)
    total += layer.out_features * keep * lay.columns
    if layer.bias is not None and keep:
        total += layer.out_features
    return total


def kept_groups(arch: Architecture, mu: ModelUnit) -> torch.Tensor:
    """Boolean (groups,): the groups whose output-projection columns are not all zero."""
    lay = layout(arch, mu)
    W = arch.module(lay.output).weight
    return W.reshape(W.shape[0], lay.groups, lay.columns).ne(0).any(dim=2).any(dim=0)


def kept_parameters(arch: Architecture, units: list[ModelUnit]) -> int:
    """Parameters of the given units that export keeps, counted from the model's weights."""
    return sum(unit_parameters(arch, mu, int(kept_groups(arch, mu).sum())) for mu in units)


def block_widths(arch: Architecture, units: list[ModelUnit]) -> dict[str, dict[str, int]]:
    """Per searched unit, what it keeps: ``{"kv_heads": k, "heads": h}`` or ``{"channels": c}``."""
    heads, kv_heads, _ = arch.heads
    widths = {}
    for mu in units:
        kept = int(kept_groups(arch, mu).sum())
        widths[mu.name] = {"kv_heads": kept, "heads": kept * heads // kv_heads} if mu.kind == "attention" else \
            {"channels": kept}
    return widths


@torch.no_grad()
def reform_subnetwork(model, arch: Architecture, units: list[ModelUnit], dense: dict[str, torch.Tensor],
                      sequences: torch.Tensor, reformation, *, batch_size: int = 8, progress: bool = True) -> dict:
    """Rectify the output projection of every unit whose groups were partly pruned.

    Block after block, on the inputs the compressed model itself produces (each block's
    earlier units already rectified), the Hessian H of the output projection's input is
    collected and its kept columns are solved for so that the layer's output matches the
    dense layer's on those inputs, using the pruned columns' information (``dense``: the
    dense weights by parameter name). ``reformation`` is a ``kinds.base.Reformation``.
    The weights change in place. Returns the summed layer errors tr((W - W_hat) H (W -
    W_hat)^T) before (the masked layer) and after.
    """
    pending = defaultdict(list)
    for mu in units:
        kept = kept_groups(arch, mu)
        if 0 < int(kept.sum()) < len(kept):
            pending[mu.block].append((mu, kept))
    report = {"method": reformation.method, "layers": sum(map(len, pending.values())), "error_before": 0.0,
              "error_after": 0.0}
    if not pending:
        return report
    inputs = capture_block_inputs(model, arch, sequences, batch_size)
    for b in tqdm(range(max(pending) + 1), desc="reformation", unit="block", disable=not progress):
        block = arch.blocks[b]
        for mu, kept in sorted(pending[b], key=lambda item: item[0].kind != "attention"):  # forward order
            lay = layout(arch, mu)
            layer = arch.module(lay.output)
            hessian = Hessian(layer.in_features, device=layer.weight.device)
            # The pruned groups' inputs are what reformation learns from: compute them with
            # the dense input projections (kept groups' inputs are the same either way).
            inputs_masked = {name: p.detach().clone() for name, p in _parameters(arch, lay.inputs).items()}
            for name, p in _parameters(arch, lay.inputs).items():
                p.copy_(dense[name])
            handle = layer.register_forward_pre_hook(lambda module, args: hessian.add_batch(args[0]))
            try:
                for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
                    run_block(block, hidden, kwargs)
            finally:
                handle.remove()
                for name, p in _parameters(arch, lay.inputs).items():
                    p.copy_(inputs_masked[name])
            W = dense[f"{lay.output}.weight"].to(layer.weight.device)
            columns = kept.repeat_interleave(lay.columns).to(W.device)
            if reformation.method == "admm":
                W_hat, _ = reform(W, hessian.H, columns, rho=reformation.rho, iterations=reformation.iterations,
                                  damp=reformation.damp)
            else:
                W_hat = reform_closed_form(W, hessian.H, columns, damp=reformation.damp)
            report["error_before"] += layer_error(W, W * columns, hessian.H)
            report["error_after"] += layer_error(W, W_hat, hessian.H)
            layer.weight.copy_(W_hat)
        inputs.hidden = [run_block(block, hidden, kwargs) for hidden, kwargs in zip(inputs.hidden, inputs.kwargs)]
    log.info("reformation (%s) of %d layers: summed layer error %.4g -> %.4g", reformation.method,
             report["layers"], report["error_before"], report["error_after"])
    return report


def _parameters(arch: Architecture, linears) -> dict[str, torch.nn.Parameter]:
    return {f"{name}.{kind}": p for name in linears for kind, p in arch.module(name).named_parameters()}


# --- export -------------------------------------------------------------------------

@torch.no_grad()
def slice_to_kept(arch: Architecture, units: list[ModelUnit]) -> set[str]:
    """Remove the pruned heads and channels from the model's layers, in place; return the units
    that keep nothing (export removes those sub-blocks whole).

    The widths are read from the output projections (``kept_groups``): q/k/v (gate/up) keep
    the rows of the kept groups, o_proj (down_proj) their columns. ``evosearch.export`` reads
    each block's sizes back from the sliced layers.
    """
    removed = set()
    for mu in units:
        lay = layout(arch, mu)
        kept = kept_groups(arch, mu)
        output = arch.module(lay.output)
        if not kept.any():
            if output.bias is not None and output.bias.any():
                raise EvosearchError(f"{mu.name} keeps no heads or channels but its output bias is not zero; "
                                     f"only a sub-block with a zero output bias can be removed exactly")
            removed.add(mu.name)
            continue
        if kept.all():
            continue
        for name in lay.inputs:
            _replace_linear(arch, name, rows=kept.repeat_interleave(lay.rows[name]).to(output.weight.device))
        _replace_linear(arch, lay.output, columns=kept.repeat_interleave(lay.columns).to(output.weight.device))
    return removed


def _replace_linear(arch: Architecture, name: str, rows: torch.Tensor | None = None,
                    columns: torch.Tensor | None = None) -> None:
    """Swap a linear layer for one holding only the given rows (outputs) or columns (inputs)."""
    old = arch.module(name)
    weight = old.weight[rows] if rows is not None else old.weight[:, columns]
    bias = None if old.bias is None else (old.bias[rows] if rows is not None else old.bias)
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                          dtype=weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    new.requires_grad_(old.weight.requires_grad)
    parent, child = name.rsplit(".", 1)
    setattr(arch.module(parent), child, new)
