"""The main job: a model and a budget in, the best non-uniform compression of it out.

``run_search(settings, out)`` loads the model and the text, builds (or reuses) the
database of compressed weights, caches the dense teacher's outputs, searches, puts the
winner in place, measures it against the dense model and writes ``out/``:

    recipe.yaml    the run as a recipe (`evosearch.recipe`), written when it starts, so
                   even an interrupted search says how to resume it
    space.yaml     the search space made concrete for this model and budget: every
                   unit's levels and their resources (an `evosearch.Space`)
    result.json    assignment per unit, budget used (planned and counted from the
                   weights), fitness, perplexity before and after, the Pareto set of
                   a multi-objective search, the recipe, versions
    model/         the compressed model (``save_pretrained``) and its tokenizer
    study.journal  every evaluated candidate (an Optuna study in a journal file; ``--resume``
                   continues it; earlier searches kept it in study.db, which is still read)

``SearchSettings`` is the whole run as data, so a run is reproducible from its
``result.json`` alone (``evosearch run DIR/result.json``). With ``workers`` the candidates
are evaluated by worker processes (`evosearch.workers`) that rebuild the fitness from those
settings, stored in the study: ``worker_fitness`` is what each of them runs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import platform
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evosearch import __version__, assets, subnetwork
from evosearch.candidate import CandidateModel
from evosearch.compression import (CompressionSpace, QuantizationSpace, SearchProblem, SparsityQuantSpace, WidthSpace,
                                   parse_quant_key)
from evosearch.data import load_corpus
from evosearch.database.build import build_database
from evosearch.database.quantization import distinct_per_group, packed_bytes
from evosearch.database.store import Database
from evosearch.engine import search
from evosearch.errors import EvosearchError
from evosearch.evaluate import Teacher, perplexity
from evosearch.fitness import KLFitness
from evosearch.model import (check_context, default_device, load_config, load_model, model_fingerprint,
                             resolve_dtype, vocab_size)
from evosearch.samplers import SAMPLERS, make_sampler
from evosearch.samplers.evopress import EvoPress
from evosearch.samplers.optuna_samplers import OptunaSampler
from evosearch.units import architecture
from evosearch.workers import Workers, open_storage

log = logging.getLogger("evosearch")


class SearchSettings(BaseModel):
    """Everything that determines a search's result."""

    model_config = ConfigDict(extra="forbid")

    space: str = "sparsity"
    budget: float
    budget_resource: str | None = Field(None, description="latency_ms, prefill_ms or bytes: the budget is a "
                                        "whole-model limit on that resource (default: the space's own budget)")
    hardware: str | None = Field(None, description="hardware table (evosearch profile) for latency budgets")
    model: str | None = None
    sampler: str = "evopress"
    sampler_options: dict = Field(default_factory=dict)
    generations: int | None = Field(None, ge=0, description="EvoPress generations")
    trials: int | None = Field(None, ge=1, description="the most fitness evaluations")
    seed: int = 0
    corpus: str | None = None
    text_field: str = "text"
    sequence_length: int = Field(512, ge=16)
    calibration_sequences: int = Field(16, ge=1, description="sequences for the database's Hessians")
    fidelities: list[int] = Field(default_factory=lambda: [512, 2048],
                                  description="calibration tokens per selection stage (the last is the full fitness)")
    top_k: int | None = Field(None, ge=1, description="keep only the teacher's top-k log-probabilities")
    compile: bool | None = Field(None, description="torch.compile the blocks for the fitness (fuses their "
                                 "elementwise work); default: on a GPU, where it halves a candidate's time")
    eval_tokens: int = Field(8192, ge=1)
    device: str | None = None
    dtype: str | None = None
    database: str | None = Field(None, description="database folder (default: in the cache, keyed by its inputs)")
    storage: str | None = Field(None, description="Optuna storage URL (default: out/study.journal)")
    baselines: list[str] | None = Field(None, description="baselines to report beside the search (default: the space's)")
    workers: int | None = Field(None, ge=1, description="evaluate candidates on this many worker processes sharing "
                                                        "the storage (Optuna samplers then ask this many at a time)")

    @field_validator("fidelities")
    @classmethod
    def _increasing(cls, fidelities: list[int]) -> list[int]:
        if not fidelities or fidelities[0] < 1 or any(a >= b for a, b in zip(fidelities, fidelities[1:])):
            raise EvosearchError(f"--fidelities must be increasing token counts like 512,2048 (the last is the full "
                                 f"fitness), got {','.join(map(str, fidelities))}")
        return fidelities

    @model_validator(mode="after")
    def _sampler_settings(self) -> SearchSettings:
        """EvoPress's settings mean nothing to other samplers, and Optuna's need a number of trials. (A space's
        own sampler defaults are EvoPress's too, but ``run_search`` passes them to EvoPress only.)"""
        if self.sampler != "evopress":
            given = ["generations"] * (self.generations is not None) + list(self.sampler_options)
            evopress_only = [name for name in given if name in inspect.signature(EvoPress).parameters]
            if evopress_only:
                raise EvosearchError(f"--{evopress_only[0].replace('_', '-')} applies to --sampler evopress only "
                                     f"(this search uses {self.sampler}); drop it")
        if self.sampler not in SAMPLERS:  # owl and shortgpt are registered per problem, and a name may be unknown
            return self
        sampler = make_sampler(self.sampler, self.sampler_options)  # a bad option fails here, not after the database
        if isinstance(sampler, OptunaSampler) and self.trials is None:
            raise EvosearchError(f"--sampler {self.sampler} needs --trials N: the number of candidates it evaluates")
        return self


def default_storage(out: Path) -> str:
    """The study of a search folder: a journal file (each evaluation is appended in a few
    milliseconds, where SQLite through Optuna's ORM took tens: on a fast fitness that was
    most of a generation's time), or the ``study.db`` of a search started before."""
    earlier = out / "study.db"
    if earlier.exists():
        return f"sqlite:///{earlier.resolve()}"
    return str((out / "study.journal").resolve())


def prepare_output(out: Path, resume: bool, force: bool) -> None:
    """Refuse to overwrite a finished or interrupted search unless told to."""
    if out.exists() and any(out.iterdir()):
        finished = (out / "result.json").exists()
        if force:
            shutil.rmtree(out)
        elif not resume:
            what = "a finished search" if finished else "an interrupted search or other files"
            raise EvosearchError(f"--out {out} already holds {what}; pass --resume to continue it or --force to "
                                 f"start over")
    out.mkdir(parents=True, exist_ok=True)


def run_search(settings: SearchSettings, out: str | Path, *, resume: bool = False, force: bool = False,
               progress: bool = True, remote: bool = False) -> dict:
    """Run the search that `settings` describe into `out`. With ``settings.workers``, start
    that many local workers, or with `remote` wait for as many ``evosearch worker``
    processes started elsewhere."""
    from evosearch.recipe import Recipe  # the recipe module builds on SearchSettings

    if settings.workers and not settings.storage:
        raise EvosearchError("--workers needs --storage that workers can share: a journal file (path ending in "
                             ".journal) on one host, or postgresql://... across hosts")
    out = Path(out)
    spec = CompressionSpace.load(settings.space)
    _check_before_loading(settings, spec)
    prepare_output(out, resume, force)
    recipe = Recipe.from_settings(settings, out)
    # A resumed run keeps the files of the run it continues until it finishes: were these settings
    # refused (another seed, say), the folder would otherwise describe a search it does not hold.
    _write_unless_resumed(out / "recipe.yaml", recipe.to_yaml(), resume)
    if settings.workers:
        open_storage(settings.storage)  # refuses SQLite and reaches the server before anything is loaded
    clock = _Stopwatch()

    model, tokenizer, arch, problem, table, corpus, fitness_tokens = _load(settings, spec, settings.device)
    _write_unless_resumed(out / "space.yaml", f"# {spec.name or 'search'} space for this model and budget "
                          f"{settings.budget:g}: each unit's levels and their resources\n" + problem.space.to_yaml(),
                          resume)
    eval_windows = corpus.evaluation_windows(settings.eval_tokens, 1024)
    clock.lap("load")

    fingerprint = model_fingerprint(model)
    database = _open_database(settings, problem, fingerprint, corpus)
    calibration = corpus.calibration_sequences(settings.calibration_sequences, settings.sequence_length,
                                               seed=settings.seed)
    build_database(model, arch, problem, database, calibration, progress=progress)
    clock.lap("database")

    teacher = Teacher.build(model, fitness_tokens, top_k=settings.top_k, progress=progress)
    dense_ppl = _dense_perplexity(model, tokenizer, eval_windows, fingerprint, corpus)
    clock.lap("teacher")

    candidate = CandidateModel(model, arch, problem, database)
    if candidate.device.type == "cuda":  # swaps become device-to-device copies
        free, _ = torch.cuda.mem_get_info(candidate.device)
        log.info("database on the GPU: %.2f GiB", candidate.preload(max_bytes=0.5 * free) / 2**30)
    fitness = KLFitness(candidate, teacher, compile_blocks=_compile(settings, model))
    fitness.fidelities = sorted(settings.fidelities)
    # A space's sampler defaults (offspring...) are those of EvoPress, the default sampler; others take none of them.
    sampler_options = (dict(spec.sampler) if settings.sampler == "evopress" else {}) | settings.sampler_options
    if settings.generations is not None and settings.sampler == "evopress":
        sampler_options["generations"] = settings.generations
    if problem.starts and settings.sampler == "evopress":
        sampler_options.setdefault("starts", problem.starts)
    _register_heuristics(problem, database)
    storage = settings.storage or default_storage(out)
    study_name = f"evosearch-{spec.name or 'search'}"
    evaluation = nullcontext(fitness) if not settings.workers else Workers(
        storage, study_name, count=settings.workers, options=settings.model_dump(), fidelities=fitness.fidelities,
        local=not remote, devices=[settings.device] if settings.device else _gpus())
    with evaluation as evaluate:
        result = search(problem.space, evaluate, problem.budget, sampler=settings.sampler, n_trials=settings.trials,
                        seed=settings.seed, storage=storage, study_name=study_name, resume=resume,
                        sampler_options=sampler_options, progress=progress)
    clock.lap("search")

    width = isinstance(spec.compression, WidthSpace)
    if width:  # from here on a sub-network is its masks, then their reformation
        candidate.reformed_levels = False
        candidate.mark_changed(problem.model_units)
    baselines = {}
    for name in spec.baselines if settings.baselines is None else settings.baselines:
        baselines[name] = _evaluate_baseline(name, problem, fitness, candidate, eval_windows, tokenizer, progress)
        if width:
            baselines[name] |= _reform_and_evaluate(baselines[name], problem, candidate, teacher, calibration,
                                                    eval_windows, tokenizer, progress)
    clock.lap("baselines")

    best = result.best.assignment
    candidate.apply(best)
    final_kl = teacher.kl(model)
    compressed = perplexity(model, eval_windows, tokenizer=tokenizer, progress=progress)
    evaluated = {"kl": final_kl, "perplexity": compressed.perplexity}
    if width:
        evaluated |= _reform_and_evaluate(evaluated, problem, candidate, teacher, calibration, eval_windows,
                                          tokenizer, progress)
    clock.lap("evaluate")
    model.save_pretrained(out / "model")  # as the search saw it; `evosearch export` removes what is pruned
    tokenizer.save_pretrained(out / "model")
    report = {
        "settings": settings.model_dump(),
        "space": {"name": spec.name, "description": spec.description, "units": len(problem.space.units),
                  "compression": spec.compression.model_dump()},
        "budget": {"resource": problem.budget.resource, "label": problem.budget.label, "value": settings.budget,
                   "planned": problem.budget.usage(problem.space, best),
                   "measured": measured_usage(model, arch, problem, candidate.current)}
                  | _whole_model(settings, problem, best, table),
        "database": str(database.root) if database.root else None,
        "assignment": best,
        "fitness": {"kl": evaluated["kl"], "tokens": teacher.max_tokens, "search_value": result.best.value},
        "perplexity": {"corpus": corpus.name, "tokens": compressed.tokens, "dense": dense_ppl,
                       "compressed": evaluated["perplexity"]},
        "baselines": baselines,
        "parameters": {"dense": sum(u.params for u in problem.model_units.values()),
                       "kept": kept_parameters(model, arch, problem)},
        "search": {"sampler": settings.sampler, "evaluations": result.n_evaluations,
                   "seconds": round(result.wall_time, 1), "best_trial": result.best.trial,
                   "study": result.study_name,
                   "pareto": [{"trial": c.trial, "kl": c.value, "usage": c.usage} for c in result.pareto]},
        "timings": clock.times,
        "versions": versions(),
        "recipe": recipe.model_dump(mode="json"),
    }
    if isinstance(spec.compression, QuantizationSpace):
        report["quantization"] = quantized_usage(arch, problem, candidate.current)
        report["formats"] = applied_formats(problem, candidate.current)
    if width:
        report["reformation"] = evaluated["reformation"]
        report["widths"] = subnetwork.block_widths(arch, list(problem.model_units.values()))
    (out / "result.json").write_text(json.dumps(report, indent=1))
    (out / "recipe.yaml").write_text(recipe.to_yaml())
    return report


def search_problem(settings: SearchSettings, spec: CompressionSpace, arch) -> tuple[SearchProblem, object]:
    """The search problem of a run, and the hardware table its budget uses (or None).

    With ``budget_resource`` (latency_ms, prefill_ms, bytes) the budget is a whole-model limit:
    the units get those resources from the hardware table (``evosearch.hardware``) and the
    budget bounds their sum by the limit minus the rest of the model.
    """
    if settings.budget_resource is None:
        problem, table = spec.materialize(arch, settings.budget), None
    else:
        from evosearch import hardware

        table = hardware.HardwareTable.load(settings.hardware) if settings.hardware else None
        problem = hardware.attach(spec.materialize_levels(arch), table)
        problem = problem.with_budget(hardware.budget_for(settings.budget_resource, settings.budget, problem, table))
    problem.budget.check(problem.space)  # the search would, but only after the database is built
    return problem, table


def _whole_model(settings: SearchSettings, problem: SearchProblem, best: dict, table) -> dict:
    """A hardware budget's limit is on the whole model: the planned total of the units plus the rest."""
    if settings.budget_resource is None:
        return {}
    from evosearch import hardware

    if settings.budget_resource == "bytes":
        rest = hardware.base_bytes(problem)
    else:
        rest = table.rest(problem, "decode_ms" if settings.budget_resource == "latency_ms" else "prefill_ms")
    return {"whole_model_planned": rest + problem.budget.usage(problem.space, best),
            "target": None if table is None else f"{table.target} ({table.device})"}


def _check_before_loading(settings: SearchSettings, spec: CompressionSpace) -> None:
    """Refuse what the space, the model's configuration and this machine's memory already rule out,
    before a model is loaded, a database built or the output folder written."""
    if settings.budget_resource is None:
        spec.check_budget(settings.budget)
    config = load_config(settings.model)
    check_context(config, settings.sequence_length, "--sequence-length")
    _check_fitness_memory(settings, config)


def _check_fitness_memory(settings: SearchSettings, config) -> None:
    """The fitness keeps the teacher's outputs and, for prefix reuse, every block's input (and the last
    block's output) on all its tokens, on the model's device: refuse fidelities that cannot fit there,
    which would otherwise run until the kernel kills the process minutes in."""
    device = torch.device(settings.device) if settings.device else default_device()
    tokens = _fitness_sequences(settings) * settings.sequence_length
    teacher = Teacher.storage_bytes(tokens, config.vocab_size, settings.top_k)
    itemsize = resolve_dtype(settings.dtype, device).itemsize
    inputs = (config.num_hidden_layers + 1) * tokens * config.hidden_size * itemsize
    available, memory = _available_memory(device)
    if teacher + inputs <= available:
        return
    kept = (f"the teacher's top-{settings.top_k} log-probabilities" if settings.top_k else
            f"the teacher's log-probabilities, tokens x vocabulary {config.vocab_size:,} x 4 bytes")
    fix = "" if settings.top_k else "pass --top-k 64 (the teacher keeps 64 log-probabilities a token) or "
    raise EvosearchError(
        f"--fidelities up to {max(settings.fidelities)}: the fitness keeps {_gib(teacher + inputs)} for its "
        f"{tokens:,} tokens ({kept}: {_gib(teacher)}; every block's input, for prefix reuse: {_gib(inputs)}) but "
        f"{_gib(available)} of {memory} is available; {fix}use fewer fidelity tokens")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _available_memory(device: torch.device) -> tuple[int, str]:
    """Bytes free where the fitness keeps its tensors (the model's device), and what that memory is."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"memory on {device}"
    try:  # MemAvailable: what can be used without swapping, reclaimable page cache included
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(fields["MemAvailable"].split()[0]) * 1024, "host memory"
    except (OSError, KeyError, ValueError):  # no /proc (macOS): all of it
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host memory"


def _fitness_sequences(settings: SearchSettings) -> int:
    """Calibration sequences of the fitness: whole sequences covering the largest fidelity."""
    return math.ceil(max(settings.fidelities) / settings.sequence_length)


def _load(settings: SearchSettings, spec: CompressionSpace, device: str | None):
    """The model, problem (with its hardware table, if any), corpus and fitness tokens that `settings` name."""
    model, tokenizer = load_model(settings.model, device=device, dtype=settings.dtype)
    arch = architecture(model)
    problem, table = search_problem(settings, spec, arch)
    corpus = load_corpus(settings.corpus, tokenizer, text_field=settings.text_field,
                         vocab_size=vocab_size(model))
    sequences, length = _fitness_sequences(settings), settings.sequence_length
    if sequences > len(corpus.calibration) // length:
        raise EvosearchError(f"--fidelities up to {max(settings.fidelities)} needs {sequences} sequences of {length} "
                             f"tokens, but corpus {corpus.name!r} has {len(corpus.calibration):,} calibration tokens; "
                             f"use fewer fidelity tokens or a larger corpus")
    fitness_tokens = corpus.calibration_sequences(sequences, length, seed=settings.seed + 1)
    return model, tokenizer, arch, problem, table, corpus, fitness_tokens


def worker_fitness(options: dict, device: str | None = None) -> KLFitness:
    """The KL fitness of the search that `options` (its `SearchSettings`) describe, built in a
    worker process on `device` (default: the search's).

    The worker only reads the database: the search builds it before it queues any
    evaluation, and many workers must not build one database at once.
    """
    settings = SearchSettings(**options)
    model, _, arch, problem, _, corpus, fitness_tokens = _load(settings, CompressionSpace.load(settings.space),
                                                               device or settings.device)
    database = _open_database(settings, problem, model_fingerprint(model), corpus)
    missing = [f"{unit}/{key}" for unit, keys in problem.keys.items() for key in keys
               if key not in ("dense", "drop") and not database.has(unit, key)]
    if missing:
        raise EvosearchError(f"database {database.root} lacks {len(missing)} entries (such as {missing[0]}); "
                             f"workers read the search's database: on another host, give them its folder "
                             f"(--database on a shared file system)")
    teacher = Teacher.build(model, fitness_tokens, top_k=settings.top_k, progress=False)
    fitness = KLFitness(CandidateModel(model, arch, problem, database), teacher,
                        compile_blocks=_compile(settings, model))
    fitness.fidelities = sorted(settings.fidelities)
    return fitness


def _gpus() -> list[str]:
    """One device per local worker, round robin: the visible GPUs, else the CPU."""
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]


def _write_unless_resumed(path: Path, text: str, resume: bool) -> None:
    if not (resume and path.exists()):
        path.write_text(text)


class _Stopwatch:
    """Seconds spent in each stage of a run."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage] = round(now - self._last, 1)
        self._last = now


def _compile(settings: SearchSettings, model) -> bool:
    """Compile the blocks where it was asked for, or by default on a GPU (CPU compilation is slow and gains little)."""
    if settings.compile is not None:
        return settings.compile
    return next(model.parameters()).device.type == "cuda"


def _evaluate_baseline(name: str, problem: SearchProblem, fitness: KLFitness, candidate: CandidateModel,
                       eval_windows: torch.Tensor, tokenizer, progress: bool) -> dict:
    """A baseline sampler's answer on the same database, fitness and held-out text."""
    result = search(problem.space, fitness, problem.budget, sampler=name, seed=0, progress=False)
    candidate.apply(result.best.assignment)
    ppl = perplexity(candidate.model, eval_windows, tokenizer=tokenizer, progress=progress)
    return {"kl": fitness.teacher.kl(candidate.model), "perplexity": ppl.perplexity,
            "usage": problem.budget.usage(problem.space, result.best.assignment), "assignment": result.best.assignment}


def _reform_and_evaluate(evaluated: dict, problem: SearchProblem, candidate: CandidateModel, teacher: Teacher,
                         calibration: torch.Tensor, eval_windows: torch.Tensor, tokenizer, progress: bool) -> dict:
    """Reform the sub-network in place (``evaluated`` holds its masked kl and perplexity) and measure
    it again: the kl and perplexity after reformation, and a ``reformation`` record of both."""
    model, arch = candidate.model, candidate.arch
    reformation = problem.spec.compression.reform
    started = time.perf_counter()
    record = subnetwork.reform_subnetwork(model, arch, list(problem.model_units.values()), candidate.dense,
                                          calibration, reformation, progress=progress)
    candidate.mark_changed(problem.model_units)
    seconds = time.perf_counter() - started
    kl = teacher.kl(model)
    ppl = perplexity(model, eval_windows, tokenizer=tokenizer, progress=progress).perplexity
    record |= reformation.model_dump() | {"kl_before": evaluated["kl"], "kl_after": kl,
                                          "perplexity_before": evaluated["perplexity"], "perplexity_after": ppl,
                                          "seconds": round(seconds, 1)}
    return {"kl": kl, "perplexity": ppl, "reformation": record}


def _open_database(settings: SearchSettings, problem: SearchProblem, fingerprint: str, corpus) -> Database:
    comp = problem.spec.compression
    identity = {"model": fingerprint, "compression": comp.kind, "method": getattr(comp, "method", None),
                "corpus": hashlib.sha256(corpus.calibration.tobytes()).hexdigest()[:16],
                "sequences": settings.calibration_sequences, "length": settings.sequence_length,
                "seed": settings.seed, "dtype": str(settings.dtype)}
    if isinstance(comp, QuantizationSpace):
        identity["format"] = comp.format_identity()
    stored_reform = getattr(comp, "reform", None)
    if isinstance(comp, WidthSpace) and comp.fitness == "masked":
        stored_reform = None  # such a database holds importance orders only, which reformation does not change
    if stored_reform is not None:  # reformed entries differ from plain ones; other databases keep their key
        identity["reform"] = stored_reform.model_dump()
    root = Path(settings.database) if settings.database else (
        assets.cache_dir() / "databases" / hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16])
    return Database(root, identity=identity)


def _dense_perplexity(model, tokenizer, windows: torch.Tensor, fingerprint: str, corpus) -> float:
    """The dense model's perplexity, cached: it is the same for every search on that model and text."""
    key = hashlib.sha256(fingerprint.encode() + windows.numpy().tobytes()).hexdigest()[:16]
    path = assets.cache_dir() / "evaluations" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())["perplexity"]
    value = perplexity(model, windows, tokenizer=tokenizer).perplexity
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"perplexity": value, "corpus": corpus.name}))
    return value


def measured_usage(model, arch, problem: SearchProblem, applied: dict[str, str] | None = None) -> float | None:
    """The budget's resource counted from the model's weights, not from the plan.

    Quantised layers do not show their bit-width, so for them ``applied`` (unit ->
    database key, ``CandidateModel.current``) says which format each layer holds and
    ``quantized_usage`` checks the weights against it.
    """
    resource = problem.budget.resource
    if isinstance(problem.spec.compression, QuantizationSpace):
        return quantized_usage(arch, problem, applied)[resource]
    if resource == "sparsity":
        zeros = sum(int((arch.module(u).weight == 0).sum()) for u in problem.model_units)
        return zeros / sum(arch.module(u).weight.numel() for u in problem.model_units)
    if resource == "dropped":
        return float(sum(is_dropped(arch, mu) for mu in problem.model_units.values()))
    if resource in ("latency_ms", "prefill_ms", "bytes"):
        return None  # counted on the export (evosearch.json's tensor_bytes) and measured on the target, not here
    if resource == "kept":
        units = list(problem.model_units.values())
        return subnetwork.kept_parameters(arch, units) / sum(mu.params for mu in units)
    raise EvosearchError(f"no way to count {resource!r} from weights")


def applied_formats(problem: SearchProblem, applied: dict[str, str]) -> dict[str, dict]:
    """Each quantised layer's format and pruned zeros, as ``evosearch.heal`` reads ``result.json``'s
    ``formats`` (healing then keeps every layer on its grid and its zeros at zero)."""
    comp = problem.spec.compression
    formats = {}
    for unit in problem.model_units:
        zeros, bits = parse_quant_key(applied[unit])
        formats[unit] = {"bits": bits, "group_size": comp.group_size, "symmetric": comp.symmetric, "zeros": zeros}
    return formats


def quantized_usage(arch, problem: SearchProblem, applied: dict[str, str]) -> dict[str, float]:
    """Average bits, packed bytes, their fraction of float16 and the non-zero weights of the
    searched layers in the formats ``applied`` names, checked against the weights.

    A layer's bit-width is taken from the applied format and verified: every group of
    its weights must hold at most 2^bits distinct values. Zeros are counted from the
    weights, so a joint level's bytes are those of the weights as they are, which is the
    bitmask export writes (rounding may zero a few more than pruning did, so this is at
    most the level's count; the quantisation-only spaces store every weight).
    """
    comp = problem.spec.compression
    joint = isinstance(comp, SparsityQuantSpace)
    weights = bits = nbytes = nonzeros = 0
    for unit in problem.model_units:
        W = arch.module(unit).weight
        _, b = parse_quant_key(applied[unit])
        fmt = comp.format(b)
        most = int(distinct_per_group(W, fmt.group_size).max())
        if most > 2**b:
            raise RuntimeError(f"{unit} holds {most} distinct values in one group: not the applied {b}-bit format")
        count = int(torch.count_nonzero(W))
        weights += W.numel()
        bits += b * W.numel()
        nbytes += packed_bytes(tuple(W.shape), fmt, count if joint else None)
        nonzeros += count if joint else W.numel()
    usage = {"bits": bits / weights, "bytes": float(nbytes), "fp16_fraction": nbytes / (2 * weights),
             "params": float(nonzeros)}
    if joint:
        usage["sparsity"] = 1 - nonzeros / weights
    return usage


def is_dropped(arch, mu) -> bool:
    """A block is dropped when its output projection is all zeros."""
    outputs = {"attention": [arch.attention_linears(mu.block)[1]], "mlp": [arch.mlp_linears(mu.block)[1]],
               "block": [arch.attention_linears(mu.block)[1], arch.mlp_linears(mu.block)[1]]}[mu.kind]
    return all(not arch.module(name).weight.any() for name in outputs)


def kept_parameters(model, arch, problem: SearchProblem) -> int:
    """Non-zero parameters left in the searched units (a dropped block keeps none); for a
    sub-network, the parameters of its kept heads and channels (what export keeps)."""
    if isinstance(problem.spec.compression, WidthSpace):
        return subnetwork.kept_parameters(arch, list(problem.model_units.values()))
    total = 0
    for mu in problem.model_units.values():
        if mu.kind != "linear" and is_dropped(arch, mu):
            continue
        total += sum(int(torch.count_nonzero(p)) for name in mu.linears for p in arch.module(name).parameters())
    return total


def versions() -> dict[str, str]:
    import optuna
    import transformers

    return {"evosearch": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "optuna": optuna.__version__, "numpy": np.__version__, "python": platform.python_version()}


def _register_heuristics(problem: SearchProblem, database: Database) -> None:
    """Make the model-specific baselines (OWL, ShortGPT) available as samplers for this problem."""
    from evosearch.samplers import heuristics

    heuristics.register_for(problem, database)
