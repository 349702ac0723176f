"""Build a database: every searched unit at every level, compressed once from calibration data.

The model is processed block by block, so memory holds one block's statistics at a time:
the calibration hidden states enter block 0, each block's linear layers record the
Hessian of their inputs (X Xᵀ) while the block runs, the block's units are compressed at
every level, and the block's dense outputs become the next block's inputs. Propagation
is dense on purpose: a database serves every mix of levels, so there is no single
compressed prefix to propagate through.

The same pass records the per-unit statistics that the heuristic baselines need: OWL's
outlier ratio per block and ShortGPT's block influence (1 - cosine similarity between a
sub-block's input and output residual stream).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from evosearch import subnetwork
from evosearch.compression import (QuantizationSpace, SearchProblem, SparsityQuantSpace, SparsitySpace, WidthSpace,
                                   parse_quant_key)
from evosearch.database.hessian import Hessian
from evosearch.database.quantization import GPTQ, rtn_quantize
from evosearch.database.sparsity import SparseGPT, magnitude_prune, wanda_prune
from evosearch.database.store import Database
from evosearch.database.structured import reform, reform_closed_form
from evosearch.units import Architecture

log = logging.getLogger("evosearch")

OWL_OUTLIER_FACTOR = 5.0  # OWL's M: a weight is an outlier when its Wanda score exceeds M x the layer mean


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


@torch.inference_mode()
def build_database(model, arch: Architecture, problem: SearchProblem, database: Database,
                   sequences: torch.Tensor, *, batch_size: int = 8, progress: bool = True) -> None:
    """Fill ``database`` with every (unit, level) of ``problem`` it lacks, and the baselines' statistics."""
    missing = {unit: [k for k in needed_keys(problem, unit) if not database.has(unit, k)] for unit in problem.keys}
    need_stats = not database.stats
    if not any(missing.values()) and not need_stats:
        log.info("database %s is complete", database.root or "(memory)")
        return
    comp = problem.spec.compression
    by_block = defaultdict(list)
    for unit, keys in missing.items():
        if keys:
            by_block[problem.model_units[unit].block].append(unit)
    last = len(arch.blocks) - 1 if need_stats else max(by_block)
    inputs = capture_block_inputs(model, arch, sequences, batch_size)
    for b in tqdm(range(last + 1), desc="database", unit="block", disable=not progress):
        block = arch.blocks[b]
        linears = arch.linears(b)
        wants_hessians = (by_block[b] or need_stats) and isinstance(comp, (SparsitySpace, QuantizationSpace,
                                                                           WidthSpace))
        hessians = _hessian_hooks(arch, b) if wants_hessians else {}
        handles = [arch.module(name).register_forward_hook(hook) for name, hook in hessians.get("hooks", {}).items()]
        influence = _InfluenceMeter(arch, b) if need_stats else None
        try:
            outputs = []
            for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
                if influence is not None:
                    influence.begin(hidden)
                out = run_block(block, hidden, kwargs)
                if influence is not None:
                    influence.end(out)
                outputs.append(out)
        finally:
            for handle in handles:
                handle.remove()
            if influence is not None:
                influence.remove()
        if influence is not None:
            for unit, value in influence.results().items():
                database.stats.setdefault(unit, {})["block_influence"] = value
        if hessians:
            per_linear = hessians["per_linear"]
            if need_stats:
                database.stats.setdefault(arch.block_name(b), {})["outlier_ratio"] = _outlier_ratio(
                    [(arch.module(n).weight, per_linear[n].column_norms()) for n in linears])
            for unit in by_block[b]:
                if isinstance(comp, WidthSpace):
                    _width_unit(comp, arch, problem.model_units[unit], per_linear, missing[unit], database)
                elif isinstance(comp, QuantizationSpace):
                    _quantize_unit(comp, arch.module(unit).weight, per_linear[unit], unit, missing[unit], database)
                else:
                    _compress_unit(comp, arch.module(unit).weight, per_linear[unit], unit, missing[unit], database)
        inputs.hidden = outputs
    database.save_stats()


def needed_keys(problem: SearchProblem, unit: str) -> list[str]:
    """The database entries a unit needs: its compressed levels; for a width unit the
    importance order of its groups, and its levels only when the search scores reformed ones."""
    comp = problem.spec.compression
    levels = [k for k in problem.keys[unit] if k not in ("dense", "drop")]
    if isinstance(comp, WidthSpace):
        return ["order"] + (levels if comp.fitness == "reformed" else [])
    return levels


def _hessian_hooks(arch: Architecture, b: int) -> dict:
    """One Hessian per distinct input: q/k/v share theirs, as do gate/up."""
    attn_in, attn_out = arch.attention_linears(b)
    mlp_in, mlp_out = arch.mlp_linears(b)
    per_linear, hooks = {}, {}
    for group in (attn_in, [attn_out], mlp_in, [mlp_out]):
        hessian = Hessian(arch.module(group[0]).in_features, device=arch.module(group[0]).weight.device)
        for name in group:
            per_linear[name] = hessian
        hooks[group[0]] = lambda module, args, output, h=hessian: h.add_batch(args[0])
    return {"per_linear": per_linear, "hooks": hooks}


def _compress_unit(comp: SparsitySpace, weight: torch.Tensor, hessian: Hessian, unit: str, keys: list[str],
                   database: Database) -> None:
    """Every missing level of one linear layer; SparseGPT sweeps all unstructured levels at once."""
    levels = {}  # key -> (sparsity, N:M pattern or None)
    for key in keys:
        if ":" in key:
            n, m = map(int, key.split(":"))
            levels[key] = (n / m, (n, m))
        else:
            levels[key] = (int(key.split("=")[1]) / weight.numel(), None)
    pruned = {}
    if comp.method == "sparsegpt":
        solver = SparseGPT(weight, hessian.H)
        unstructured = [k for k, (_, nm) in levels.items() if nm is None]
        pruned = dict(zip(unstructured, solver.prune_levels([levels[k][0] for k in unstructured])))
        pruned |= {k: solver.prune(s, nm) for k, (s, nm) in levels.items() if nm is not None}
    elif comp.method == "wanda":
        pruned = {k: wanda_prune(weight, hessian.column_norms(), s, nm) for k, (s, nm) in levels.items()}
    else:
        pruned = {k: magnitude_prune(weight, s, nm) for k, (s, nm) in levels.items()}
    for key, value in pruned.items():
        if comp.reform is not None:
            r = comp.reform
            value, _ = reform(weight, hessian.H, value != 0, rho=r.rho, iterations=r.iterations, damp=r.damp,
                              start=value)
        database.put(unit, key, {f"{unit}.weight": value.to(weight.dtype)})


def _quantize_unit(comp: QuantizationSpace, weight: torch.Tensor, hessian: Hessian, unit: str, keys: list[str],
                   database: Database) -> None:
    """Every missing level of one linear layer: pruned first (joint levels), then quantised at
    each bit-width, with the pruned weights kept at zero; GPTQ sweeps all bit-widths at once."""
    by_zeros = defaultdict(list)  # zeros -> [(key, bits)]
    for key in keys:
        zeros, bits = parse_quant_key(key)
        by_zeros[zeros].append((key, bits))
    pruned = {0: weight}
    if sparse := sorted(by_zeros.keys() - {0}):
        pruned |= _prune(comp, weight, hessian, sparse)
    for zeros, levels in by_zeros.items():
        W = pruned[zeros]
        keep = W != 0 if zeros else None  # the pruning mask
        fmts = [comp.format(bits) for _, bits in levels]
        if comp.method == "gptq":  # every bit-width in one sweep
            quantized = GPTQ(W, hessian.H, act_order=comp.act_order).quantize_many(fmts, keep)
        else:  # round-to-nearest maps a zero to the zero point, so it keeps zeros with no mask
            quantized = [rtn_quantize(W, fmt) for fmt in fmts]
        for (key, _), q in zip(levels, quantized):
            database.put(unit, key, {f"{unit}.weight": q.dequantize()})


def _prune(comp: SparsityQuantSpace, weight: torch.Tensor, hessian: Hessian, zeros: list[int]) -> dict[int, torch.Tensor]:
    """The layer pruned to each number of zeros, by the joint space's pruning method."""
    sparsities = [z / weight.numel() for z in zeros]
    if comp.pruning == "sparsegpt":
        pruned = SparseGPT(weight, hessian.H).prune_levels(sparsities)
    elif comp.pruning == "wanda":
        pruned = [wanda_prune(weight, hessian.column_norms(), s) for s in sparsities]
    else:
        pruned = [magnitude_prune(weight, s) for s in sparsities]
    return dict(zip(zeros, pruned))


def _width_unit(comp: WidthSpace, arch: Architecture, mu, per_linear: dict[str, Hessian], keys: list[str],
                database: Database) -> None:
    """A width unit's importance order and, for a reformed search, each level's output projection
    rectified in closed form (exact for kept columns; the final sub-network gets ``comp.reform``)."""
    lay = subnetwork.layout(arch, mu)
    if "order" in keys:
        scores = subnetwork.importance(arch, mu, {name: per_linear[name].H for name in (*lay.inputs, lay.output)})
        database.put(mu.name, "order", {"order": subnetwork.importance_order(scores)})
    order = database.get(mu.name, "order", device=arch.module(lay.output).weight.device)["order"]
    W = arch.module(lay.output).weight
    for key in keys:
        if key == "order":
            continue
        kept = subnetwork.kept_by_order(order, int(key.split("=")[1]))  # kv_heads=K or channels=C: groups kept
        columns = kept.repeat_interleave(lay.columns)
        W_hat = reform_closed_form(W, per_linear[lay.output].H, columns, damp=comp.reform.damp)
        database.put(mu.name, key, {f"{lay.output}.weight": W_hat.to(W.dtype)})


def _outlier_ratio(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """OWL's layerwise outlier distribution: the share of a block's weights whose Wanda score
    |W_ij| * ||X_j|| exceeds M times its layer's mean score."""
    outliers, total = 0, 0
    for weight, norms in layers:
        score = weight.abs().float() * norms.float()[None, :]
        outliers += int((score > OWL_OUTLIER_FACTOR * score.mean()).sum())
        total += score.numel()
    return outliers / total


class _InfluenceMeter:
    """ShortGPT's block influence per unit: 1 - E[cos(residual in, residual out)] over tokens."""

    def __init__(self, arch: Architecture, b: int):
        self.arch = arch
        self.b = b
        self.names = {kind: u.name for u in arch.units(("attention", "mlp", "block")) if u.block == b
                      for kind in [u.kind]}
        self.sums = defaultdict(float)
        self.count = 0
        attention = arch.module(f"{arch.block_name(b)}.{arch.family.attention}")
        self.handle = attention.register_forward_hook(self._attention_output)

    def _attention_output(self, module, args, output):
        self.attn = output[0] if isinstance(output, tuple) else output

    def begin(self, hidden):
        self.hidden = hidden

    def end(self, out):
        mid = self.hidden + self.attn
        cos = torch.nn.functional.cosine_similarity
        pairs = {"attention": (self.hidden, mid), "mlp": (mid, out), "block": (self.hidden, out)}
        for kind, (x, y) in pairs.items():
            self.sums[kind] += float((1 - cos(x.float(), y.float(), dim=-1)).sum())
        self.count += self.hidden.shape[0] * self.hidden.shape[1]

    def remove(self):
        self.handle.remove()

    def results(self) -> dict[str, float]:
        return {self.names[kind]: value / self.count for kind, value in self.sums.items()}
