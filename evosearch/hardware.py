"""Hardware targets: what each unit costs at each level on a device, measured, as budget resources.

``profile(model, target, workload)`` times every unit of the model (linear layers,
attention and MLP sub-blocks, whole blocks) in the form an export gives it, for one
workload: ``prefill_ms``, one forward over ``batch x prompt`` tokens, and ``decode_ms``,
one generated token, averaged over ``new_tokens`` steps after the prompt (the KV cache
grows from ``prompt`` tokens as in real decoding). What is timed per unit is a *latency
class*: a level as it runs once exported (``Level.runtime_module``). A search's levels map
onto classes through their kind (``Compression.latency_class``):

- ``dense``: dense weights; also unstructured sparsity and N:M patterns other than 2:4,
  which an export stores dense and runs at dense speed;
- ``2:4``: a semi-structured sparse weight where the GPU runs one (else dense speed);
- ``bits=...`` (its whole format: ``bits=4,group=64,sym``): a packed layer through the
  dequantising matmul (``kernels/quant.py``); a pruned and quantised level too, since export
  unpacks its bitmask layout to the dense packed one on loading;
- ``drop``: nothing runs, 0 ms.

Units of one shape cost the same, so each distinct shape is timed once per class. The
rest of the model (embeddings, final norm, output head, per-step overhead) is the table's
``base``: the measured dense model minus the sum of its dense units. A whole model is then
predicted as ``base + sum over units``; ``benchmarks/export_latency.py`` checks that
against the measured latency of the exported model.

The table is JSON (target, device name, dtype, workload, torch and transformers versions,
date): ``HardwareTable.save``/``load``; ``default_path`` keys it by model, target, dtype
and workload in the cache. ``attach(problem, table)`` adds the resources ``latency_ms``
(per generated token: the decode phase), ``prefill_ms`` and ``bytes`` (the kind's
``unit_bytes``, exact) to every unit of a search problem, so that a budget on them works
like any other. ``budget_for`` turns a whole-model limit into the budget on the units (the
limit minus ``base``).
"""

from __future__ import annotations

import datetime
import inspect
import logging
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm.auto import tqdm

from evosearch import assets
from evosearch.errors import EvosearchError, first_problem
from evosearch.kinds import Drop, Level, level_from_name
from evosearch.layouts import dense_bytes
from evosearch.problem import SearchProblem
from evosearch.space import Budget
from evosearch.units import Architecture, ModelUnit, architecture
from evosearch.version import versions

log = logging.getLogger("evosearch")

RESOURCES = ("latency_ms", "prefill_ms", "bytes")
DEFAULT_BITS = ("bits=4,group=64,sym", "bits=8,group=64,sym")


class Workload(BaseModel):
    """The request shape latencies are measured for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch: int = Field(1, ge=1)
    prompt: int = Field(2048, ge=1, description="prompt tokens: the prefill, and the KV cache decoding starts from")
    new_tokens: int = Field(128, ge=1, description="generated tokens decode_ms averages over")


class HardwareTable(BaseModel):
    """Measured costs per unit and latency class, and the rest of the model (base)."""

    model_config = ConfigDict(extra="forbid")

    target: str  # "cpu", "cuda", "cuda:1"
    device: str  # what the target is, e.g. "NVIDIA H200"
    dtype: str
    workload: Workload
    model: str  # model fingerprint
    units: dict[str, dict[str, dict[str, float]]]  # unit -> class -> {"prefill_ms", "decode_ms", "bytes"}
    base: dict[str, dict[str, float]]  # per covering (COVERINGS): prefill_ms, decode_ms, bytes outside those units
    whole: dict[str, float]  # the dense model as measured: prefill_ms, decode_ms, bytes
    versions: dict[str, str]
    date: str

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HardwareTable":
        path = Path(path)
        if not path.exists():
            raise EvosearchError(f"hardware table {path} does not exist; make one with `evosearch profile`")
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as exc:  # also invalid JSON
            raise EvosearchError(f"hardware table {path}: {first_problem(exc)} ({exc.error_count()} problems in all); "
                                 f"pass a table that `evosearch profile` wrote") from None

    def cost(self, unit: str, cls: Level, phase: str) -> float:
        """``phase`` (prefill_ms or decode_ms) of ``unit`` at the latency class ``cls``."""
        if isinstance(cls, Drop):
            return 0.0
        try:
            return self.units[unit][cls.name][phase]
        except KeyError:
            raise EvosearchError(f"hardware table for {self.target} has no {cls.name!r} cost for {unit}; profile "
                                 f"again with that level (evosearch profile --bits ...)") from None

    def rest(self, problem: SearchProblem, phase: str) -> float:
        """``phase`` of everything outside the problem's units (embeddings, head, overhead, unsearched parts)."""
        kinds = {mu.kind for mu in problem.model_units.values()}
        covering = next((name for name, covered in COVERINGS.items() if kinds <= set(covered)), None)
        if covering is None:
            raise EvosearchError(f"a latency budget over units of kinds {sorted(kinds)} is not supported; search "
                                 f"blocks, attention/MLP blocks or linear layers")
        if covering not in self.base:
            raise EvosearchError(f"hardware table for {self.target} has no {covering} units; profile them")
        return self.base[covering][phase] + sum(
            self.units[u.name]["dense"][phase] for u in _covered(problem.arch, covering)
            if u.name not in problem.model_units)

    def predict(self, problem: SearchProblem, assignment: dict, phase: str = "decode_ms") -> float:
        """Whole-model latency of an assignment: the rest plus every unit at its level."""
        kind = problem.compression
        return self.rest(problem, phase) + sum(self.cost(unit, kind.latency_class(level), phase)
                                               for unit, level in problem.typed(assignment).items())


# The units that together hold every block's compute, one set per way of cutting blocks up;
# ``base`` is the dense model minus each set at dense.
COVERINGS = {"block": ("block",), "attention+mlp": ("attention", "mlp"), "linear": ("linear",)}


def _covered(arch: Architecture, covering: str) -> list[ModelUnit]:
    return arch.units(COVERINGS[covering])


def latency_classes(names) -> tuple[Level, ...]:
    """The latency classes ``names`` spell (``dense``, ``2:4``, ``bits=4,group=64,sym``), checked before
    minutes of timing."""
    return tuple(level_from_name(name) for name in names)


# --- timing ------------------------------------------------------------------------------------------

@dataclass
class Timer:
    """Median (``statistic``) over repetitions of the mean time per call, with device events on a GPU."""

    device: torch.device
    repeats: int = 7
    warmup: int = 2
    statistic: Callable[[list[float]], float] = statistics.median  # min: less sensitive to a busy machine

    def _clock(self):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            return lambda: (end.record(), end.synchronize(), start.elapsed_time(end))[-1]
        begin = time.perf_counter()
        return lambda: (time.perf_counter() - begin) * 1e3

    def time(self, setup: Callable[[], object], step: Callable[[object], None], calls: int) -> float:
        """ms per ``step(state)``, ``calls`` steps per repetition after an untimed ``setup()``."""
        samples = []
        for r in range(self.warmup + self.repeats):
            state = setup()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            stop = self._clock()
            for _ in range(calls):
                step(state)
            elapsed = stop()
            if r >= self.warmup:
                samples.append(elapsed / calls)
        return self.statistic(samples)


def _cache_keyword(function) -> str:
    """transformers 5.2x renamed ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def _new_cache():
    from transformers import DynamicCache

    return DynamicCache()


@torch.inference_mode()
def measure_model(model, workload: Workload, timer: Timer) -> dict[str, float]:
    """The whole model's prefill and per-token decode latency (ms), on random tokens."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (workload.batch, workload.prompt), generator=generator).to(device)
    token = torch.randint(0, vocab, (workload.batch, 1), generator=generator).to(device)
    keyword = _cache_keyword(model.forward)

    def prefill(_):
        model(input_ids=prompt, use_cache=False, logits_to_keep=1)

    def start_decoding():
        cache = _new_cache()
        model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{keyword: cache})
        return cache

    def decode(cache):
        model(input_ids=token, use_cache=True, **{keyword: cache})

    return {"prefill_ms": timer.time(lambda: None, prefill, 1),
            "decode_ms": timer.time(start_decoding, decode, workload.new_tokens)}


class _UnitRunner:
    """Runs one unit of a Llama-style model alone, on random hidden states of the workload's shapes."""

    def __init__(self, model, arch: Architecture, workload: Workload, dtype: torch.dtype, device: torch.device):
        self.model, self.arch, self.workload = model, arch, workload
        generator = torch.Generator().manual_seed(1)
        hidden = model.config.hidden_size
        self.prompt = torch.randn(workload.batch, workload.prompt, hidden, generator=generator).to(device, dtype)
        self.token = torch.randn(workload.batch, 1, hidden, generator=generator).to(device, dtype)
        rotary = getattr(model.base_model, "rotary_emb", None)
        positions = torch.arange(workload.prompt + workload.new_tokens, device=device)[None]
        self.rotary = None if rotary is None else rotary(self.prompt, positions)

    def _positions(self, start: int, length: int) -> dict:
        """The position arguments of a block or attention call: rotary tables where the model has them."""
        if self.rotary is None:
            return {}
        cos, sin = self.rotary
        return {"position_embeddings": (cos[:, start:start + length], sin[:, start:start + length])}

    def callable(self, unit: ModelUnit, module) -> Callable:
        """f(hidden, start, cache) running ``module`` as the unit's part of a block."""
        if unit.kind == "linear":
            return lambda h, start, cache: module(h)
        if unit.kind == "mlp":
            norm = self.arch.norm(unit.block, "mlp")
            return lambda h, start, cache: h + module(norm(h))
        keyword = _cache_keyword(module.forward)
        if unit.kind == "attention":
            norm = self.arch.norm(unit.block, "attention")
            return lambda h, start, cache: h + module(hidden_states=norm(h), attention_mask=None,
                                                      **self._positions(start, h.shape[1]), **{keyword: cache})[0]
        return lambda h, start, cache: module(h, attention_mask=None, **self._positions(start, h.shape[1]),
                                              use_cache=cache is not None, **{keyword: cache})

    def time(self, unit: ModelUnit, module, timer: Timer) -> dict[str, float]:
        run = self.callable(unit, module)
        w = self.workload
        prompt, token = self.prompt, self.token
        if unit.kind == "linear":  # a linear layer's input has its own width (down_proj: the MLP's)
            columns = self.arch.module(unit.name).in_features
            prompt, token = (torch.randn(*x.shape[:-1], columns, device=x.device, dtype=x.dtype)
                             for x in (prompt, token))
        prefill = timer.time(lambda: None, lambda _: run(prompt, 0, None), 1)
        if unit.kind in ("linear", "mlp"):
            decode = timer.time(lambda: None, lambda _: run(token, w.prompt, None), w.new_tokens)
            return {"prefill_ms": prefill, "decode_ms": decode}

        def start_decoding():
            cache = _new_cache()
            run(self.prompt, 0, cache)
            return [cache, w.prompt]

        def step(state):
            run(self.token, state[1], state[0])
            state[1] += 1

        return {"prefill_ms": prefill, "decode_ms": timer.time(start_decoding, step, w.new_tokens)}


def _signature(arch: Architecture, unit: ModelUnit) -> tuple:
    """Units with equal signatures run the same computation (shapes, biases)."""
    shapes = tuple((tuple(arch.module(n).weight.shape), arch.module(n).bias is not None) for n in unit.linears)
    return unit.kind, shapes


@torch.inference_mode()
def profile(model, target: str | torch.device, workload: Workload = Workload(), *,
            classes: tuple[Level, ...] | None = None, kinds=("linear", "attention", "mlp", "block"),
            timer: Timer | None = None, progress: bool = True) -> HardwareTable:
    """Measure every unit of ``model`` (already on ``target``) at every latency class (default: dense,
    2:4 and ``DEFAULT_BITS``)."""
    classes = latency_classes(("dense", "2:4", *DEFAULT_BITS)) if classes is None else tuple(classes)
    device = next(model.parameters()).device
    if device.type != torch.device(target).type:
        raise EvosearchError(f"the model is on {device}, not on the target {target}; load it there to profile")
    timer = timer or Timer(device)
    arch = architecture(model)
    dtype = next(model.parameters()).dtype
    runner = _UnitRunner(model, arch, workload, dtype, device)
    measured: dict[tuple, dict[str, dict[str, float]]] = {}
    units = arch.units(kinds)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for unit in tqdm(units, desc="profile", unit="unit", disable=not progress):
        signature = _signature(arch, unit)
        costs = measured.setdefault(signature, {})
        table[unit.name] = {}
        for cls in classes:
            if not cls.applies_to(unit):
                continue
            if cls.name not in costs:
                module = cls.runtime_module(arch, unit, device)
                if module is None:  # nothing runs it faster here (2:4 without the kernels): an export runs it dense
                    costs[cls.name] = dict(costs.get("dense") or runner.time(unit, arch.sub_block(unit), timer))
                else:
                    costs[cls.name] = runner.time(unit, module, timer)
            table[unit.name][cls.name] = costs[cls.name] | {"bytes": float(cls.bytes(arch, unit))}
    whole = measure_model(model, workload, timer)
    whole["bytes"] = float(model_bytes(model))
    base = _base(arch, table, whole)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    log.info("profiled %d units on %s (%s): dense model prefill %.2f ms, decode %.3f ms/token", len(units), target,
             name, whole["prefill_ms"], whole["decode_ms"])
    return HardwareTable(target=str(target), device=name, dtype=str(dtype).removeprefix("torch."), workload=workload,
                         model=_fingerprint(model), units=table, base=base, whole=whole, versions=versions(),
                         date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def model_bytes(model) -> int:
    """Bytes of the model's parameters (tied ones once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _base(arch: Architecture, table: dict, whole: dict) -> dict[str, dict[str, float]]:
    """Per covering whose units were profiled: the dense model minus those units at dense."""
    base = {}
    for covering in COVERINGS:
        units = _covered(arch, covering)
        if all(u.name in table for u in units):
            base[covering] = {phase: whole[phase] - sum(table[u.name]["dense"][phase] for u in units)
                              for phase in ("prefill_ms", "decode_ms", "bytes")}
    return base


def default_path(fingerprint: str, target: str, dtype: str, workload: Workload) -> Path:
    slug = target.replace(":", "")
    return (assets.cache_dir() / "hardware" /
            f"{fingerprint}-{slug}-{dtype}-b{workload.batch}-p{workload.prompt}-n{workload.new_tokens}.json")


# --- as resources of a search problem -------------------------------------------------------------

def resources(problem: SearchProblem, table: HardwareTable | None) -> dict[str, dict[str, list[float]]]:
    """Per resource, per unit, one value per level: bytes, and latency_ms and prefill_ms from a table."""
    kind = problem.compression
    out: dict[str, dict[str, list[float]]] = {name: {} for name in RESOURCES if table is not None or name == "bytes"}
    for unit in problem.space.units:
        mu, levels = problem.model_units[unit.name], problem.levels[unit.name]
        out["bytes"][unit.name] = [float(kind.unit_bytes(problem.arch, mu, level)) for level in levels]
        if table is not None:
            classes = [kind.latency_class(level) for level in levels]
            out["latency_ms"][unit.name] = [table.cost(unit.name, c, "decode_ms") for c in classes]
            out["prefill_ms"][unit.name] = [table.cost(unit.name, c, "prefill_ms") for c in classes]
    return out


def attach(problem: SearchProblem, table: HardwareTable | None) -> SearchProblem:
    """The problem with ``bytes`` (and, from a table, ``latency_ms`` and ``prefill_ms``) on every unit."""
    if table is not None and table.model != _fingerprint(problem.arch.model):
        log.warning("hardware table for %s was measured on another model (or other weights) than this one",
                    table.target)
    return problem.with_resources(resources(problem, table))


def base_bytes(problem: SearchProblem) -> float:
    """Bytes of everything in the model that no unit of the problem holds (embeddings, norms...)."""
    arch = problem.arch
    return model_bytes(arch.model) - sum(dense_bytes(arch, mu) for mu in problem.model_units.values())


def budget_for(resource: str, limit: float, problem: SearchProblem, table: HardwareTable | None) -> Budget:
    """The budget on the units that keeps the whole model at or under ``limit`` (ms or bytes)."""
    if resource == "bytes":
        rest = base_bytes(problem)
    elif resource not in RESOURCES:
        raise EvosearchError(f"--budget {resource}=...: hardware budgets are {', '.join(RESOURCES)}")
    elif table is None:
        raise EvosearchError(f"a {resource} budget needs a hardware table; make one with `evosearch profile`")
    else:
        rest = table.rest(problem, "decode_ms" if resource == "latency_ms" else "prefill_ms")
    if limit <= rest:
        raise EvosearchError(f"--budget {resource}={limit:g} is under what the model costs outside the searched units "
                             f"({rest:.4g}); raise it")
    return Budget(resource=resource, max_total=limit - rest)


def _fingerprint(model) -> str:
    from evosearch.model import model_fingerprint

    return model_fingerprint(model)
