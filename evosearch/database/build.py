"""Build a database: every searched unit at every level, compressed once from calibration data.

The model is processed block by block, so memory holds one block's statistics at a time:
the calibration hidden states enter block 0, each block's linear layers record the
Hessian of their inputs (X Xᵀ) while the block runs, the block's units are compressed at
every level, and the block's dense outputs become the next block's inputs. Propagation
is dense on purpose: a database serves every mix of levels, so there is no single
compressed prefix to propagate through.

The same pass records the per-unit statistics that the heuristic baselines need: OWL's
outlier ratios per block (one per outlier factor M of its sweep) and ShortGPT's block influence (1 - cosine similarity between a
sub-block's input and output residual stream).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from evosearch.blocks import capture_block_inputs, run_block
from evosearch.database.hessian import Hessian
from evosearch.database.store import Database
from evosearch.problem import SearchProblem
from evosearch.units import Architecture

log = logging.getLogger("evosearch")

OWL_OUTLIER_FACTORS = (3, 5, 7, 10)  # OWL's M (EvoPress's sweep): an outlier's Wanda score exceeds M x the block mean


@torch.inference_mode()
def build_database(model, arch: Architecture, problem: SearchProblem, database: Database,
                   sequences: torch.Tensor, *, batch_size: int = 8, progress: bool = True) -> None:
    """Fill ``database`` with every (unit, level) of ``problem`` it lacks, and the baselines' statistics."""
    kind = problem.compression
    missing = {unit: [k for k in needed_entries(problem, unit) if not database.has(unit, k)]
               for unit in problem.model_units}
    need_stats = not _has_stats(database, arch)
    if not any(missing.values()) and not need_stats:
        log.info("database %s is complete", database.root or "(memory)")
        return
    by_block = defaultdict(list)
    for unit, keys in missing.items():
        if keys:
            by_block[problem.model_units[unit].block].append(unit)
    last = len(arch.blocks) - 1 if need_stats else max(by_block)
    inputs = capture_block_inputs(model, arch, sequences, batch_size)
    for b in tqdm(range(last + 1), desc="database", unit="block", disable=not progress):
        block = arch.blocks[b]
        linears = arch.linears(b)
        hessians = _hessian_hooks(arch, b) if (by_block[b] or need_stats) and kind.needs_hessians() else {}
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
        per_linear = hessians.get("per_linear", {})
        if per_linear and need_stats:
            database.stats.setdefault(arch.block_name(b), {})["outlier_ratios"] = _outlier_ratios(
                [(arch.module(n).weight, per_linear[n].column_norms()) for n in linears])
        for unit in by_block[b]:
            kind.build(arch, problem.model_units[unit], per_linear, missing[unit], problem.levels[unit], database)
        inputs.hidden = outputs
    database.save_stats()


def needed_entries(problem: SearchProblem, unit: str) -> list[str]:
    """The database entries a unit needs (its kind says which: its stored levels, an importance order...)."""
    return problem.compression.entries(problem.model_units[unit], problem.levels[unit])


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


def _has_stats(database: Database, arch: Architecture) -> bool:
    """Whether the database holds the baselines' statistics as this version reads them (a database built
    by an earlier one has OWL's ratio for one M only: the statistics are gathered again, its entries kept)."""
    first = database.stats.get(arch.block_name(0), {})
    return "block_influence" in first and "outlier_ratios" in first


def _outlier_ratios(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """OWL's outlier ratio of a block for each M of ``OWL_OUTLIER_FACTORS``: the share of the block's weights
    whose Wanda score |W_ij| * ||X_j|| exceeds M times the mean score of all the block's weights (as OWL
    and the EvoPress reference compute it, over the block, not per layer)."""
    scores = [weight.abs().float() * norms.float()[None, :] for weight, norms in layers]
    total = sum(score.numel() for score in scores)
    mean = sum(float(score.sum()) for score in scores) / total
    return {str(m): sum(int((score > m * mean).sum()) for score in scores) / total for m in OWL_OUTLIER_FACTORS}


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
