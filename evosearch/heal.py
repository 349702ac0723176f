"""Healing: distil a searched model from the dense one, with its compression kept exactly.

``heal(result_dir, HealSettings(tokens=N))`` (the command ``evosearch heal RESULT_DIR --tokens N``)
trains the compressed model of a search result to match the dense model's next-token
distributions on calibration text, and writes into the result directory:

    healed/            the healed model (``save_pretrained``) and its tokenizer, plus
                       ``quantized.safetensors`` when layers are quantised (below)
    result.json        a ``heal`` section: the settings, the text used, the loss curve,
                       perplexity and KL to the dense model before and after, the checks
    heal-checkpoint/   while it runs, every ``checkpoint_every`` steps: the trained tensors,
                       the optimiser, the step and the random state; a new heal of the same
                       folder with the same settings continues from it

``model/`` (the searched model) is left as it was. ``summary(section)`` renders the heal
section as text (the CLI prints it).

Objective
---------
Per position, with p the dense teacher's and q the student's next-token distribution:
``kl`` is KL(p || q), the usual distillation loss; ``reverse-kl`` is KL(q || p), the
mode-seeking divergence of MiniLLM (here per token, not MiniLLM's sequence-level policy
gradient); ``mix`` is w KL(p || q) + (1 - w) KL(q || p). The teacher is the dense model
(``settings.model`` of the search), run on each batch beside the student: its outputs are
streamed, never cached. The output heads and the loss run on chunks of rows under
activation checkpointing, so no (tokens x vocabulary) tensor exists whole, and the
student's blocks run under gradient checkpointing. Trained weights are float32 master
copies (16 bytes per trained parameter with AdamW); on a GPU the forward passes run in
bfloat16 autocast. AdamW without weight decay, linear warm-up, cosine decay, gradient
norm clipped to 1.

Text
----
Windows of the calibration part of the search's corpus (never its evaluation part),
drawn with ``seed`` among those that share no token with the windows the search drew
(the database's Hessians and the fitness; ``search_draws``). The KL reported before and
after is measured on the search's fitness sequences, which the heal therefore never saw.
When N tokens are more than the free text holds, the heal passes over it several times
(logged).

What stays as searched
----------------------
Each unit's kind says it (``Compression.keep``, from the unit's typed level in ``result.json``),
and the weights in ``model/`` give the zeros:

- zeros: every weight that is zero in a linear layer of a searched unit (the assignment's
  keys; for attention/MLP/block units, their linear layers) stays zero: pruned weights
  (unstructured, N:M) and heads or channels zeroed in place. Their gradients are masked,
  and after every step a check confirms that none of them moved.
- dropped units: an attention, MLP or block unit at a ``Drop`` level (its output
  projections all zeros, ``Architecture.is_dropped``) has its linear layers frozen, so it
  stays dropped whether export removes it or not.
- sliced widths: no parameter changes shape (checked on the saved model).
- quantised layers, listed in ``result.json`` under ``formats`` (below): straight-through
  quantisation-aware training. Each layer keeps a float32 master weight W and a trainable
  scale per (row, group); its forward uses s (clamp(round(W / s) + z, 0, 2^bits - 1) - z),
  rounding passed straight through (LSQ's gradients for W and s, the scale trained in log
  space). The zero point z and the format stay fixed, so the healed weights lie on a grid
  of the layer's format by construction: there is no re-quantisation step and no error
  from one. The grid starts as the one the searched weights lie on (``recover_grid``;
  groups on no grid of the format are re-fitted by round-to-nearest, and the section
  reports how many weights that changed).

A quantised layer's format is its level's (``Quant``: bits, group size, grid, and the zeros of
a pruned one); ``model/`` holds the dequantised weights, as ``CandidateModel`` puts them in place.

Interface offered to export: ``healed/quantized.safetensors`` holds, for every quantised
layer L, ``L.codes`` (uint8, W's shape), ``L.scales`` (float32, (out, groups)) and
``L.zeros`` (uint8, (out, groups)): a ``QuantizedWeight`` (``load_quantized``), whose
``dequantize()`` is bit for bit the healed weight in ``healed/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from evosearch.data import Corpus, load_corpus
from evosearch.database.quantization import QuantFormat, QuantizedWeight, recover_grid
from evosearch.errors import EvosearchError
from evosearch.evaluate import ROWS_PER_CHUNK, hidden_size, hidden_states, logits_from_hidden, perplexity
from evosearch.kernels import kl as kl_kernels
from evosearch.kinds import Keep as KindKeep
from evosearch.model import (check_context, load_config, load_model, model_fingerprint, resolve_device,
                             resolve_dtype, vocab_size)
from evosearch.run import Draw, RunFolder, RunResult
from evosearch.units import Architecture, architecture

log = logging.getLogger("evosearch")

HEALED = "healed"
CHECKPOINT = "heal-checkpoint"
QUANTIZED_FILE = "quantized.safetensors"
EVAL_WINDOW = 1024  # as the search's perplexity


class HealSettings(BaseModel):
    """Everything that determines a heal (the ``heal`` section of a recipe says the same)."""

    model_config = ConfigDict(extra="forbid")

    tokens: int = Field(ge=1, description="training tokens (rounded up to whole steps)")
    loss: Literal["kl", "reverse-kl", "mix"] = "kl"
    mix_weight: float = Field(0.5, ge=0, le=1, description="mix: the weight of KL(teacher || student)")
    lr: float = Field(5e-5, gt=0, description="peak learning rate of the weights")
    scale_lr: float = Field(1e-3, gt=0, description="peak learning rate of quantised layers' log-scales")
    batch_size: int = Field(8, ge=1, description="sequences per step")
    sequence_length: int | None = Field(None, ge=16, description="tokens per sequence (default: the search's)")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the steps with a linearly rising rate")
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    eval_corpora: list[str] = Field(default_factory=list,
                                    description="more corpora for perplexity before/after (whole texts)")
    gradient_checkpointing: bool = True
    device: str | None = None
    dtype: str | None = Field(None, description="the teacher's and the saved model's dtype (default: the search's)")


@dataclass
class Keep:
    """What healing must leave as the search chose it."""

    pruned: dict[str, torch.Tensor] = field(default_factory=dict)  # linear name -> bool mask of zeros to keep
    dropped: list[str] = field(default_factory=list)  # unit names whose output projection is zero
    frozen: set[str] = field(default_factory=set)  # parameter names left untrained
    formats: dict[str, QuantFormat] = field(default_factory=dict)  # linear name -> format


def what_to_keep(result: RunResult, arch: Architecture) -> Keep:
    """Read from a result (each unit's level, its kind's ``keep``) and the searched weights what healing
    must not change."""
    units = {u.name: u for u in arch.units()}
    levels = result.levels_for(arch)
    unknown = [name for name in levels if name not in units]
    if unknown:
        raise EvosearchError(f"result.json names units the model does not have ({unknown[0]}, ...): is model/ the "
                             f"model this search ran on?")
    kind = result.space_spec().compression
    rules = KindKeep()
    for name, level in levels.items():
        rules |= kind.keep(arch, units[name], level)
    keep = Keep(formats={name: fmt for name, (fmt, _) in rules.formats.items()}, dropped=sorted(rules.dropped))
    keep.frozen = {f"{linear}.{p}" for linear in rules.frozen for p, _ in arch.module(linear).named_parameters()}
    for name in sorted(rules.zeros - rules.frozen):
        zeros = arch.module(name).weight == 0
        if zeros.any():
            keep.pruned[name] = zeros
    return keep


# --- quantised layers: straight-through training on their grid (``recover_grid``) ----------------

class FakeQuant(nn.Module):
    """A parametrisation of a linear weight: W -> s (clamp(round(W / s) + z, 0, maxq) - z).

    Rounding passes gradients straight through; the clamp stops them outside the grid, so
    the scale gets LSQ's gradient. The scale is trained as its logarithm.
    """

    def __init__(self, grid: QuantizedWeight):
        super().__init__()
        self.fmt = grid.fmt
        self.log_scale = nn.Parameter(grid.scales.float().log())
        self.register_buffer("zero", grid.zeros.float())
        self.register_buffer("group", grid.fmt.group_index(grid.codes.shape[1], grid.codes.device))

    def codes(self, W: torch.Tensor) -> torch.Tensor:
        x = W / self.log_scale.exp()[:, self.group]
        return torch.clamp(x + (torch.round(x) - x).detach() + self.zero[:, self.group], 0, self.fmt.maxq)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return (self.log_scale.exp()[:, self.group] * (self.codes(W) - self.zero[:, self.group])).to(W.dtype)

    @torch.no_grad()
    def quantized(self, W: torch.Tensor, dtype: torch.dtype) -> QuantizedWeight:
        return QuantizedWeight(self.codes(W).to(torch.uint8), self.log_scale.exp(), self.zero.to(torch.uint8),
                               self.fmt, dtype)


def load_quantized(folder: str | Path) -> dict[str, QuantizedWeight]:
    """The codes of a healed model's quantised layers (``healed/quantized.safetensors``), by layer name."""
    from safetensors import safe_open

    path = Path(folder) / QUANTIZED_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["formats"])
        return {name: QuantizedWeight(f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scales"),
                                      f.get_tensor(f"{name}.zeros"),
                                      QuantFormat(m["bits"], m["group_size"], m["symmetric"]),
                                      getattr(torch, m["dtype"]))
                for name, m in meta.items()}


def _save_quantized(folder: Path, quantized: dict[str, QuantizedWeight]) -> None:
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for name, q in quantized.items():
        tensors |= {f"{name}.codes": q.codes, f"{name}.scales": q.scales, f"{name}.zeros": q.zeros}
        meta[name] = {"bits": q.fmt.bits, "group_size": q.fmt.group_size, "symmetric": q.fmt.symmetric,
                      "dtype": str(q.dtype).removeprefix("torch.")}
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(folder / QUANTIZED_FILE),
              metadata={"formats": json.dumps(meta)})


# --- the text ---------------------------------------------------------------------------------

def draw_starts(corpus: Corpus, draw: Draw) -> np.ndarray:
    """Where a calibration draw's windows start in ``corpus.calibration`` (as recorded, or as drawn)."""
    if draw.starts is not None:
        return np.asarray(draw.starts)
    return corpus.calibration_starts(draw.sequences, draw.length, draw.seed)


def fitness_sequences(corpus: Corpus, draw: Draw) -> torch.Tensor:
    """The sequences the search's fitness (its KL) was measured on."""
    return corpus.windows(corpus.calibration, draw_starts(corpus, draw), draw.length)


def healing_windows(corpus: Corpus, draws: dict[str, Draw], length: int) -> np.ndarray:
    """Starts (in ``corpus.calibration``) of the windows of ``length`` tokens that share no token
    with the search's ``draws`` (``RunResult.calibration_draws``): the text the heal may use."""
    free = corpus.unused_starts([(draw_starts(corpus, d), d.length) for d in draws.values()], length)
    if len(free) == 0:
        raise EvosearchError(f"corpus {corpus.name!r} has no calibration window of {length} tokens that the search "
                             f"did not use; use a shorter --sequence-length")
    return free


def _order(free: np.ndarray, needed: int, seed: int) -> np.ndarray:
    """``needed`` window starts: passes over the free windows, each in a new random order."""
    rng = np.random.default_rng(seed)
    passes = -(-needed // len(free))
    return np.concatenate([rng.permutation(free) for _ in range(passes)])[:needed]


# --- training ---------------------------------------------------------------------------------

def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
                      mix_weight: float = 0.5) -> torch.Tensor:
    """Sum over rows of the divergence ``kind`` between the teacher's and the student's distributions."""
    s = torch.log_softmax(student_logits.float(), dim=-1)
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    if kind == "kl":
        return _kl(t, s)
    if kind == "reverse-kl":
        return _kl(s, t)
    return mix_weight * _kl(t, s) + (1 - mix_weight) * _kl(s, t)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(exp(p) || exp(q)) for log-probabilities p and q."""
    return (p.exp() * (p - q)).sum()


def _chunk_loss(student, teacher, student_hidden, teacher_hidden, kind: str, mix_weight: float) -> torch.Tensor:
    with torch.no_grad():
        teacher_logits = logits_from_hidden(teacher, teacher_hidden)
    return distillation_loss(logits_from_hidden(student, student_hidden), teacher_logits, kind, mix_weight)


def _train_step(student, teacher, batch: torch.Tensor, settings: HealSettings, autocast) -> float:
    """Forward both models on one batch, backpropagate the mean loss per position, return it."""
    rows = batch.numel()
    with autocast():
        with torch.no_grad():
            teacher_hidden = hidden_states(teacher, batch).reshape(rows, -1)
        student_hidden = hidden_states(student, batch).reshape(rows, -1)
        loss = sum(checkpoint(_chunk_loss, student, teacher, student_hidden[r : r + ROWS_PER_CHUNK],
                              teacher_hidden[r : r + ROWS_PER_CHUNK], settings.loss, settings.mix_weight,
                              use_reentrant=False)
                   for r in range(0, rows, ROWS_PER_CHUNK)) / rows
    loss.backward()
    return loss.item()


class _Trainee:
    """The student set up for training: masks, frozen units, quantised layers, optimiser."""

    def __init__(self, model, arch: Architecture, keep: Keep, settings: HealSettings, steps: int):
        self.model, self.keep = model, keep
        grids = {name: recover_grid(arch.module(name).weight, fmt) for name, fmt in keep.formats.items()
                 if f"{name}.weight" not in keep.frozen}  # in the stored dtype, whose rounding they allow for
        model.float().requires_grad_(True)
        for name, param in model.named_parameters():
            if name in keep.frozen:
                param.requires_grad_(False)
        self.pruned = {}
        for name, zeros in keep.pruned.items():
            weight = arch.module(name).weight
            self._mask(weight, zeros)
            self.pruned[name] = (weight, zeros)
        self.quantizers: dict[str, FakeQuant] = {}
        self.grid = {"layers": 0, "groups": 0, "on_grid": 0, "weights_refitted": 0, "refit_error": 0.0}
        moved, norm = 0.0, 0.0
        for name, (grid, exact) in grids.items():
            layer = arch.module(name)
            quantizer = FakeQuant(grid).to(layer.weight.device)
            with torch.no_grad():
                change = quantizer(layer.weight.detach()) - layer.weight.detach()
            self.grid["layers"] += 1
            self.grid["groups"] += exact.numel()
            self.grid["on_grid"] += int(exact.sum())
            self.grid["weights_refitted"] += int((~exact)[:, quantizer.group].sum())
            moved, norm = moved + float(change.norm() ** 2), norm + float(layer.weight.detach().norm() ** 2)
            parametrize.register_parametrization(layer, "weight", quantizer)
            self.quantizers[name] = quantizer
        self.grid["refit_error"] = math.sqrt(moved / norm) if norm else 0.0
        if settings.gradient_checkpointing:  # transformers 5.2x renamed gradient_checkpointing_enable
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        self.checkpointing = settings.gradient_checkpointing
        model.train()
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        scales = [params[n] for n in self.names if n.endswith("log_scale")]
        weights = [params[n] for n in self.names if not n.endswith("log_scale")]
        groups = [{"params": weights, "lr": settings.lr}]
        if scales:
            groups.append({"params": scales, "lr": settings.scale_lr})
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
        warmup = math.ceil(settings.warmup * steps)

        def rate(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, rate)
        self.params = [params[n] for n in self.names]

    @staticmethod
    def _mask(weight: nn.Parameter, zeros: torch.Tensor) -> None:
        """Pruned weights get no gradient (AdamW then leaves them exactly at zero)."""
        weight.register_hook(lambda grad: grad.masked_fill(zeros, 0))

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for name, (weight, zeros) in self.pruned.items():
            if torch.where(zeros, weight.detach(), 0).any():
                raise RuntimeError(f"a pruned weight of {name} moved during healing")

    def state(self) -> dict:
        params = dict(self.model.named_parameters())
        return {"trained": {n: params[n].detach().cpu().clone() for n in self.names},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load(self, state: dict) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name in self.names:
                params[name].copy_(state["trained"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @torch.no_grad()
    def finish(self, dtype: torch.dtype) -> dict[str, QuantizedWeight]:
        """Back to a plain model in ``dtype`` with the healed weights in place; the quantised layers' codes."""
        quantized = {}
        arch = architecture(self.model)
        for name, quantizer in self.quantizers.items():
            layer = arch.module(name)
            quantized[name] = quantizer.quantized(layer.parametrizations.weight.original, dtype)
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        if self.checkpointing:
            disable = (getattr(self.model, "activation_checkpointing_disable", None)
                       or self.model.gradient_checkpointing_disable)
            disable()
        self.model.eval().requires_grad_(False).to(dtype)
        return quantized


# --- measurements -----------------------------------------------------------------------------

@torch.no_grad()
def streamed_kl(model, teacher, sequences: torch.Tensor, batch_size: int = 8) -> float:
    """Mean KL(teacher || model) per position over ``sequences``, the teacher run beside the model."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size].to(device)
        student, dense = (hidden_states(m, batch).reshape(-1, hidden_size(m)) for m in (model, teacher))
        for r in range(0, len(student), ROWS_PER_CHUNK):
            t = torch.log_softmax(logits_from_hidden(teacher, dense[r : r + ROWS_PER_CHUNK]), dim=-1)
            total += kl_kernels.kl_divergence(t, logits_from_hidden(model, student[r : r + ROWS_PER_CHUNK],
                                                                    upcast=False))
    return total.item() / sequences.numel()


def measure(model, arch: Architecture, keep: Keep) -> dict:
    """What the checks compare, counted from the weights: zeros of the pruned layers, which
    units are dropped, the bits each quantised layer's values need, every parameter's shape."""
    units = {u.name: u for u in arch.units(("attention", "mlp", "block"))}
    pruned = [arch.module(name).weight for name in keep.pruned]
    return {
        "zeros": sum(int((w == 0).sum()) for w in pruned),
        "weights": sum(w.numel() for w in pruned),
        "dropped": sorted(name for name in keep.dropped if arch.is_dropped(units[name])),
        "bits": {name: value_bits(arch.module(name).weight, fmt) for name, fmt in keep.formats.items()},
        "shapes": {name: list(p.shape) for name, p in model.state_dict().items()},
    }


def value_bits(W: torch.Tensor, fmt: QuantFormat) -> int:
    """The bits that the most distinct values of any (row, group) of W need."""
    step = fmt.group_size or W.shape[1]
    most = 1
    for start in range(0, W.shape[1], step):
        values = torch.sort(W[:, start : start + step], dim=1).values
        most = max(most, int((values.diff(dim=1) != 0).sum(dim=1).max()) + 1)
    return math.ceil(math.log2(most)) if most > 1 else 0


def _checks(before: dict, after: dict, keep: Keep, arch: Architecture,
            quantized: dict[str, QuantizedWeight]) -> dict:
    pruned_kept = all(not torch.where(zeros, arch.module(name).weight, 0).any() for name, zeros in keep.pruned.items())
    checks = {
        "pruned_weights_zero": pruned_kept,
        "dropped_units": after["dropped"] == before["dropped"],
        "bits": all(after["bits"][n] <= fmt.bits for n, fmt in keep.formats.items()),
        "codes_match_weights": all(torch.equal(q.dequantize(), arch.module(n).weight) for n, q in quantized.items()),
        "shapes": after["shapes"] == before["shapes"],
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise RuntimeError(f"healing changed what the search fixed: {', '.join(failed)}")
    return checks


# --- the job ----------------------------------------------------------------------------------

def heal(result_dir: str | Path, settings: HealSettings, *, force: bool = False, progress: bool = True) -> dict:
    """Heal the searched model of ``result_dir`` (see the module's docstring); returns the heal section.
    The folder is locked while it heals, as a search locks it (``RunFolder.lock``)."""
    device = resolve_device(settings.device)  # a device this machine lacks fails before --force deletes anything
    folder = RunFolder(result_dir)
    folder.require_result()
    if settings.sequence_length is not None:  # before --force deletes anything
        check_context(load_config(folder.model_path), settings.sequence_length, "--sequence-length")
    with folder.lock():
        return _heal(folder, folder.read_result(), settings, device, force, progress)


def _heal(folder: RunFolder, result: RunResult, settings: HealSettings, device: torch.device, force: bool,
          progress: bool) -> dict:
    result_dir, search = folder.path, result.settings
    healed_dir, checkpoint_dir = result_dir / HEALED, result_dir / CHECKPOINT
    if force:
        for stale in (healed_dir, checkpoint_dir):
            shutil.rmtree(stale, ignore_errors=True)
    elif result.heal is not None and healed_dir.exists():
        raise EvosearchError(f"{result_dir} already holds a healed model ({HEALED}/); pass --force to heal again")
    clock = time.perf_counter()
    dtype = resolve_dtype(settings.dtype or search.dtype, device)
    teacher, tokenizer = load_model(search.model, device=device, dtype=dtype)
    student, _ = load_model(result_dir / "model", device=device, dtype=dtype)
    arch = architecture(student)
    keep = what_to_keep(result, arch)
    corpus = load_corpus(search.corpus, tokenizer, text_field=search.text_field, vocab_size=vocab_size(student))
    length = settings.sequence_length or search.sequence_length
    draws = result.calibration_draws()
    free = healing_windows(corpus, draws, length)
    steps = -(-settings.tokens // (settings.batch_size * length))
    order = _order(free, steps * settings.batch_size, settings.seed)
    if len(order) > len(free):
        log.warning("heal: %d tokens pass %.1f times over the %d calibration tokens the search did not use",
                    len(order) * length, len(order) / len(free), len(free) * length)
    evaluations = _evaluation_texts(corpus, search, settings, tokenizer, vocab_size(student))
    kl_sequences = fitness_sequences(corpus, draws["fitness"])

    identity = {"settings": settings.model_dump(), "model": model_fingerprint(student)}
    state = _read_checkpoint(checkpoint_dir, identity)
    if state is None:
        before = measure(student, arch, keep)
        dense = {name: perplexity(teacher, windows, progress=progress).perplexity
                 for name, windows in evaluations.items()}
        metrics = _metrics(student, teacher, evaluations, kl_sequences, progress)
    else:
        before, dense, metrics = state["before"], state["dense"], state["metrics_before"]
        log.info("heal: resuming from step %d of %d (%s)", state["step"], steps, checkpoint_dir)
    torch.manual_seed(settings.seed)
    trainee = _Trainee(student, arch, keep, settings, steps)
    losses: list[float] = []
    start = 0
    if state is not None:
        trainee.load(state)
        losses, start = state["losses"], state["step"]
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    autocast = _autocast(device, dtype)
    training = time.perf_counter()
    bar = tqdm(range(start, steps), desc="heal", unit="step", initial=start, total=steps, disable=not progress)
    saved_step = start
    try:
        for step in bar:
            starts = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            batch = corpus.windows(corpus.calibration, starts, length)
            losses.append(_train_step(student, teacher, batch.to(device), settings, autocast))
            trainee.step()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if (step + 1) % settings.checkpoint_every == 0 and step + 1 < steps:
                _write_checkpoint(checkpoint_dir, identity | trainee.state() | {
                    "step": step + 1, "losses": losses, "before": before, "dense": dense, "metrics_before": metrics,
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})
                saved_step = step + 1
    except KeyboardInterrupt:
        if saved_step:
            log.warning("heal interrupted; the same command resumes it from step %d of %d (%s)", saved_step, steps,
                        checkpoint_dir)
        raise
    training_seconds = time.perf_counter() - training

    quantized = trainee.finish(dtype)
    after = _metrics(student, teacher, evaluations, kl_sequences, progress)
    partial = result_dir / f"{HEALED}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    student.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if quantized:
        _save_quantized(partial, quantized)
    saved, _ = load_model(partial, device=device, dtype=dtype)
    saved_arch = architecture(saved)
    counted = measure(saved, saved_arch, keep)
    checks = _checks(before, counted, keep, saved_arch,
                     {n: QuantizedWeight(q.codes.to(device), q.scales.to(device), q.zeros.to(device), q.fmt, q.dtype)
                      for n, q in quantized.items()})
    shutil.rmtree(healed_dir, ignore_errors=True)
    partial.rename(healed_dir)

    section = {
        "settings": settings.model_dump(),
        "text": {"corpus": corpus.name, "sequence_length": length, "sequences": len(order),
                 "tokens": len(order) * length, "free_tokens": len(free) * length,
                 "passes": round(len(order) / len(free), 3),
                 "excluded": "the search's calibration draws (database Hessians, fitness sequences)"},
        "steps": steps,
        "resumed_from": start,
        "loss": _curve(losses),
        "perplexity": {name: {"tokens": windows[:, 1:].numel(), "dense": dense[name],
                              "before": metrics["perplexity"][name], "after": after["perplexity"][name]}
                       for name, windows in evaluations.items()},
        "kl": {"tokens": kl_sequences.numel(), "before": metrics["kl"], "after": after["kl"],
               "text": "the search's fitness sequences (not used for healing)"},
        "kept": {"pruned_layers": len(keep.pruned),
                 "pruned_weights": sum(int(z.sum()) for z in keep.pruned.values()),
                 "zeros": {"before": before["zeros"], "after": counted["zeros"], "weights": before["weights"]},
                 "dropped": keep.dropped, "bits": counted["bits"], "quantized_layers": len(keep.formats),
                 "frozen_parameters": len(keep.frozen)},
        "quantization": trainee.grid if keep.formats else None,
        "checks": checks,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "seconds": round(time.perf_counter() - clock, 1), "training_seconds": round(training_seconds, 1),
        "model": HEALED,
    }
    folder.update_result(heal=section)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return section


def _evaluation_texts(corpus: Corpus, search, settings: HealSettings, tokenizer, vocab: int) -> dict:
    """Perplexity windows: the search's held-out text, then each extra corpus as a whole (it was
    used neither for the search nor for healing)."""
    texts = {corpus.name: corpus.evaluation_windows(search.eval_tokens, EVAL_WINDOW)}
    for name in settings.eval_corpora:
        if name == corpus.name:
            raise EvosearchError(f"--eval-corpus {name} is the search's corpus, whose held-out part is evaluated "
                                 f"already; name another corpus")
        other = load_corpus(name, tokenizer, vocab_size=vocab)
        whole = other.whole()
        available = len(whole.tokens) // whole.text_length(EVAL_WINDOW) * EVAL_WINDOW
        if available == 0:
            raise EvosearchError(f"corpus {name!r} is shorter than one window of {EVAL_WINDOW} tokens")
        texts[name] = whole.evaluation_windows(min(search.eval_tokens, available), EVAL_WINDOW)
    return texts


def _metrics(model, teacher, texts: dict, kl_sequences: torch.Tensor, progress: bool) -> dict:
    """The model's KL to the teacher on ``kl_sequences`` and its perplexity on each text (in eval mode)."""
    return {"kl": streamed_kl(model, teacher, kl_sequences),
            "perplexity": {name: perplexity(model, windows, progress=progress).perplexity
                           for name, windows in texts.items()}}


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return lambda: torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext


def _curve(losses: list[float], points: int = 20) -> dict:
    """The loss curve in ``points`` means over equal runs of steps, and the first and last tenth."""
    tenth = max(1, len(losses) // 10)
    edges = np.linspace(0, len(losses), min(points, len(losses)) + 1).astype(int)
    return {"first": float(np.mean(losses[:tenth])), "last": float(np.mean(losses[-tenth:])),
            "curve": [[int(b), float(np.mean(losses[a:b]))] for a, b in zip(edges[:-1], edges[1:])]}


def _read_checkpoint(folder: Path, identity: dict) -> dict | None:
    path = folder / "state.pt"
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if {k: state[k] for k in identity} != identity:
        raise EvosearchError(f"{folder} holds an interrupted heal with other settings or of another model; run "
                             f"with the same settings to resume it, or pass --force to start over")
    return state


def _write_checkpoint(folder: Path, state: dict) -> None:
    folder.mkdir(exist_ok=True)
    torch.save(state, folder / "state.pt.partial")
    (folder / "state.pt.partial").replace(folder / "state.pt")


def summary(section: dict) -> str:
    """The heal section as text: what was trained, and the before/after table."""
    s, text, loss = section["settings"], section["text"], section["loss"]
    lines = [f"healed with {text['tokens']:,} tokens of {text['corpus']} ({s['loss']}, lr {s['lr']:g}, "
             f"{section['steps']} steps, {section['training_seconds']:.0f} s of training on {section['device']}); "
             f"loss {loss['first']:.4f} -> {loss['last']:.4f}"]
    width = 34
    lines.append(f"{'':<{width}}  {'dense':>10}  {'searched':>10}  {'healed':>10}")
    for name, p in section["perplexity"].items():
        label = f"perplexity {name} ({p['tokens']:,} tokens)"
        lines.append(f"{label:<{width}}  {p['dense']:>10.3f}  {p['before']:>10.3f}  {p['after']:>10.3f}")
    kl = section["kl"]
    label = f"KL to dense ({kl['tokens']:,} tokens)"
    lines.append(f"{label:<{width}}  {0.0:>10.4f}  {kl['before']:>10.4f}  {kl['after']:>10.4f}")
    kept = section["kept"]
    lines.append(f"kept: {kept['pruned_weights']:,} pruned weights in {kept['pruned_layers']} layers, "
                 f"{len(kept['dropped'])} dropped units, {kept['quantized_layers']} quantised layers; checks "
                 + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in section["checks"].items()))
    return "\n".join(lines)
