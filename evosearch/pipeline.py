"""The main job: a model and a budget in, the best non-uniform compression of it out.

``compress(model, tokenizer, space=..., budget=..., corpus=...)`` works on objects a user
holds (a loaded ``PreTrainedModel``, its tokenizer, a corpus, text or token ids): it builds
(or reuses) the database of compressed weights, caches the dense teacher's outputs,
searches, puts the winner in place, measures it against the dense model and returns a
``Compressed``: the compressed model and the typed ``RunResult``.

``run_search(settings, out)`` is the same job as a run on disk (``evosearch search``):
it loads the model and the text that ``settings`` name, locks ``out`` and lets
``compress`` work in it (``evosearch.run.RunFolder`` says what goes where), then saves the
model and ``result.json``. With ``workers`` the candidates are evaluated by worker processes
(`evosearch.workers`) that rebuild the fitness from those settings, stored in the study:
``worker_fitness`` is what each of them runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evosearch import assets
from evosearch.candidate import CandidateModel
from evosearch.compression import CompressionSpace
from evosearch.data import Corpus, load_corpus, text_prefix
from evosearch.database.build import build_database, needed_entries
from evosearch.database.store import Database
from evosearch.engine import _storage, journal_path, search
from evosearch.errors import EvosearchError
from evosearch.evaluate import Teacher, perplexity
from evosearch.fitness import KLFitness
from evosearch.kinds import Level
from evosearch.model import (check_context, load_config, load_model, model_fingerprint, resolve_device, resolve_dtype,
                             vocab_size)
from evosearch.problem import SearchProblem
from evosearch.run import RECIPE, SPACE, BaselineRecord, BudgetRecord, Draw, RunFolder, RunResult, SearchRecord
from evosearch.samplers import heuristics
from evosearch.settings import SearchSettings
from evosearch.units import architecture
from evosearch.version import versions
from evosearch.workers import Workers, open_storage

log = logging.getLogger("evosearch")

EVAL_WINDOW = 1024  # tokens per perplexity window (the GPTQ/SparseGPT protocol)


@dataclass
class Compressed:
    """What ``compress`` returns: the compressed model (its levels in place), its tokenizer, and the result."""

    model: torch.nn.Module
    tokenizer: object
    result: RunResult
    problem: SearchProblem

    @property
    def assignment(self) -> dict:
        return self.result.assignment

    @property
    def levels(self) -> dict[str, Level]:
        return dict(self.result.levels)

    def save(self, folder: str | Path) -> RunFolder:
        """Write the model, its tokenizer and ``result.json`` as a search folder that ``evosearch export``,
        ``heal``, ``show`` and ``report`` read."""
        run = RunFolder(folder)
        run.path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(run.model_path)  # as the search saw it; `evosearch export` removes what is pruned
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(run.model_path)
        run.write_result(self.result)
        return run


def compress(model, tokenizer, *, space: str | Path = "sparsity", budget: float | None = None,
             corpus: str | Path | Corpus | None = None, text: str | list[str] | None = None, tokens=None,
             settings: SearchSettings | None = None, folder: RunFolder | None = None, resume: bool = False,
             remote: bool = False, progress: bool = True, **options) -> Compressed:
    """Search the best compression of ``model`` under ``budget`` in ``space`` and leave it in place.

    Args:
        model, tokenizer: a loaded causal LM (any family ``evosearch.units`` knows) and its tokenizer.
        space: a ready space (``sparsity``, ``quant``, ...) or a space YAML file.
        budget: the space's budget value (0.5 average sparsity, 3.5 bits ...).
        corpus / text / tokens: calibration and evaluation text: a corpus name, file or folder (or a
            ``Corpus``), raw text (a string or a list of documents), or token ids; default: Brown.
            The first 20% of its tokens are held out for perplexity, the rest calibrate.
        settings: a whole ``SearchSettings`` instead of ``space``/``budget``/``options``.
        options: any other ``SearchSettings`` field (``generations=50``, ``sampler="tpe"``,
            ``trials=200``, ``fidelities=[2048, 16384]``, ``database=...``, ``storage=...``).
        folder: a run folder to work in (``run_search`` passes its ``--out``): its study is the
            default storage and its ``space.yaml`` is written.
        resume: continue the study in the storage (same settings).

    Returns a ``Compressed``: ``.model`` (the same object, its compressed levels in place),
    ``.result`` (a ``RunResult``: levels, budget, KL, perplexity, baselines, history) and
    ``.save(folder)``.
    """
    if settings is None:
        if budget is None:
            raise EvosearchError("compress: give budget=... (the space's budget value) or settings=SearchSettings(...)")
        settings = SearchSettings(space=str(space), budget=budget, **options)
    elif options or budget is not None:
        raise EvosearchError("compress: give either settings=... or space/budget/options, not both")
    clock = _Stopwatch()
    spec = CompressionSpace.load(settings.space)
    check_settings(settings, spec, model.config.get_text_config())
    arch = architecture(model)
    problem, table = search_problem(settings, spec, arch)
    corpus = _corpus(corpus, text, tokens, tokenizer, settings)
    corpus.check_vocabulary(vocab_size(model))
    _check_fitness_text(settings, corpus)
    if folder is not None:
        folder.write_text_once(SPACE, f"# {spec.name or 'search'} space for this model and budget {settings.budget:g}: "
                               f"each unit's levels and their resources\n" + problem.space.to_yaml(), resume)
    eval_windows = corpus.evaluation_windows(settings.eval_tokens, EVAL_WINDOW)
    fitness_draw = _draws(settings)["fitness"]
    fitness_tokens = corpus.calibration_sequences(fitness_draw.sequences, fitness_draw.length, seed=fitness_draw.seed)
    clock.lap("load")

    fingerprint = model_fingerprint(model)
    database = open_database(settings, problem, fingerprint, corpus)
    draw = _draws(settings)["database"]
    calibration = corpus.calibration_sequences(draw.sequences, draw.length, seed=draw.seed)
    build_database(model, arch, problem, database, calibration, progress=progress)
    clock.lap("database")

    teacher = Teacher.build(model, fitness_tokens, top_k=settings.top_k, progress=progress)
    dense_ppl = _dense_perplexity(model, tokenizer, eval_windows, fingerprint, corpus)
    clock.lap("teacher")

    candidate = CandidateModel(model, arch, problem, database)
    if candidate.device.type == "cuda":  # swaps become device-to-device copies
        free, _ = torch.cuda.mem_get_info(candidate.device)
        log.info("database on the GPU: %.2f GiB", candidate.preload(max_bytes=0.5 * free) / 2**30)
    fitness = KLFitness(candidate, teacher, compile_blocks=_compile(settings, model),
                        fidelities=sorted(settings.fidelities))
    storage = settings.storage or (folder.study_storage() if folder is not None else None)
    study_name = f"evosearch-{spec.name or 'search'}"
    evaluation = nullcontext(fitness) if not settings.workers else Workers(
        storage, study_name, count=settings.workers, options=settings.model_dump(), fidelities=fitness.fidelities,
        local=not remote, devices=[settings.device] if settings.device else _gpus())
    with evaluation as evaluate:
        result = search(problem.space, evaluate, problem.budget, sampler=sampler_for(settings, spec, problem, database),
                        n_trials=settings.trials, seed=settings.seed, storage=storage, study_name=study_name,
                        resume=resume, sampler_options=_sampler_options(settings, spec, problem), progress=progress)
    clock.lap("search")

    candidate.end_search()
    kind = problem.compression
    baselines = {}
    for name in spec.baselines if settings.baselines is None else settings.baselines:
        baselines[name] = _baseline(name, settings, spec, problem, database, fitness, candidate, eval_windows,
                                    tokenizer, calibration, progress)
    clock.lap("baselines")

    best = result.best.assignment
    candidate.apply(best)
    evaluated = _measure(candidate, teacher, eval_windows, tokenizer, progress)
    refined = _refine(problem, candidate, teacher, calibration, eval_windows, tokenizer, evaluated, progress)
    clock.lap("evaluate")
    levels = problem.typed(best)
    counted = kind.measure(arch, problem, levels)
    budget_record = BudgetRecord(resource=problem.budget.resource, label=problem.budget.label, value=settings.budget,
                                 planned=problem.budget.usage(problem.space, best),
                                 measured=counted.get(problem.budget.resource),
                                 **_whole_model(settings, problem, best, table))
    run = RunResult(
        settings=settings,
        space={"units": len(problem.space.units)} | spec.model_dump(mode="json"),
        budget=budget_record,
        database=str(database.root) if database.root else None,
        assignment=best,
        levels=levels,
        fitness={"kl": refined["kl"], "tokens": teacher.max_tokens, "search_value": result.best.value},
        perplexity={"corpus": corpus.name, "tokens": evaluated["tokens"], "dense": dense_ppl,
                    "compressed": refined["perplexity"]},
        baselines=baselines,
        parameters={"dense": sum(u.params for u in problem.model_units.values()),
                    "kept": kind.kept_parameters(arch, problem)},
        search=SearchRecord(sampler=settings.sampler, evaluations=result.n_evaluations,
                            seconds=round(sum(result.runs), 1), runs=len(result.runs),  # resumed: all runs
                            best_trial=result.best.trial, study=result.study_name,
                            pareto=[{"trial": c.trial, "kl": c.value, "usage": c.usage} for c in result.pareto],
                            history=[p.model_dump() for p in result.history.points]),
        draws={"database": draw.model_copy(update={"starts": _starts(corpus, draw)}),
               "fitness": fitness_draw.model_copy(update={"starts": _starts(corpus, fitness_draw)})},
        timings=clock.times,
        versions=versions(),
        reformation=refined.get("reformation"),
        **kind.record(arch, problem, levels, counted),
    )
    return Compressed(model, tokenizer, run, problem)


def run_search(settings: SearchSettings, out: str | Path, *, resume: bool = False, force: bool = False,
               progress: bool = True, remote: bool = False) -> RunResult:
    """Run the search that `settings` describe into `out`. With ``settings.workers``, start
    that many local workers, or with `remote` wait for as many ``evosearch worker``
    processes started elsewhere. `out` is locked while it runs (``RunFolder.lock``)."""
    from evosearch.recipe import Recipe  # the recipe module builds on SearchSettings

    if settings.workers and not settings.storage:
        raise EvosearchError("--workers needs --storage that workers can share: a journal file (path ending in "
                             ".journal) on one host, or postgresql://... across hosts")
    if resume and force:
        raise EvosearchError("--resume and --force: pass one (--resume continues the search in --out, --force "
                             "starts it over)")
    resolve_device(settings.device)  # before anything in `out` is written or deleted
    folder = RunFolder(out)
    if settings.storage:
        _reach_storage(settings, folder.path)
    if resume and not folder.path.is_dir():
        raise EvosearchError(f"--out {out} holds no search to resume (there is no such folder); drop --resume "
                             f"to start one")
    check_settings(settings, CompressionSpace.load(settings.space), load_config(settings.model))
    with folder.lock(f"--out {out}"):  # before --force deletes anything
        folder.prepare(settings, resume, force)
        started = time.perf_counter()
        recipe = Recipe.from_settings(settings, out)
        # A resumed run keeps the files of the run it continues until it finishes: were these settings
        # refused (another seed, say), the folder would otherwise describe a search it does not hold.
        folder.write_text_once(RECIPE, recipe.to_yaml(), resume)
        model, tokenizer = load_model(settings.model, device=settings.device, dtype=settings.dtype)
        corpus = load_corpus(settings.corpus, tokenizer, text_field=settings.text_field)
        loading = time.perf_counter() - started
        compressed = compress(model, tokenizer, settings=settings, corpus=corpus, folder=folder, resume=resume,
                              remote=remote, progress=progress)
        result = compressed.result
        timings = result.timings | {"load": round(result.timings.get("load", 0) + loading, 1)}
        compressed.result = result.model_copy(update={"recipe": recipe.model_dump(mode="json"), "timings": timings})
        compressed.save(folder.path)
        folder.write_text(RECIPE, recipe.to_yaml())
        return compressed.result


def _reach_storage(settings: SearchSettings, out: Path) -> None:
    """Open the run's own storage before anything is loaded or deleted, so that a server out of reach
    or a wrong path fails at once (workers' storage: no SQLite either). A journal file in `out` is left
    to the search: the folder may not exist yet, and an empty journal there would look like a search."""
    journal = journal_path(settings.storage)
    if journal is not None and Path(journal).resolve().is_relative_to(out.resolve()):
        return
    (open_storage if settings.workers else _storage)(settings.storage)


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
        problem = hardware.attach(spec.materialize(arch, None), table)
        problem = problem.with_budget(hardware.budget_for(settings.budget_resource, settings.budget, problem, table))
    problem.budget.check(problem.space)  # the search would, but only after the database is built
    return problem, table


def check_settings(settings: SearchSettings, spec: CompressionSpace, config) -> None:
    """Refuse what the space, the model's configuration and this machine's memory already rule out,
    before a model is loaded (``run_search``), a database built or the output folder written."""
    if settings.budget_resource is None:
        spec.check_budget(settings.budget)
    check_context(config, settings.sequence_length, "--sequence-length")
    _check_fitness_memory(settings, config)


def _check_fitness_memory(settings: SearchSettings, config) -> None:
    """The fitness keeps the teacher's outputs and, for prefix reuse, every block's input (and the last
    block's output) on all its tokens, on the model's device: refuse fidelities that cannot fit there,
    which would otherwise run until the kernel kills the process minutes in."""
    device = resolve_device(settings.device)
    tokens = _draws(settings)["fitness"].sequences * settings.sequence_length
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


def _check_fitness_text(settings: SearchSettings, corpus: Corpus) -> None:
    draw = _draws(settings)["fitness"]
    if draw.sequences > len(corpus.calibration) // draw.length:
        raise EvosearchError(f"--fidelities up to {max(settings.fidelities)} needs {draw.sequences} sequences of "
                             f"{draw.length} tokens, but corpus {corpus.name!r} has {len(corpus.calibration):,} "
                             f"calibration tokens; use fewer fidelity tokens or a larger corpus")


def sampler_for(settings: SearchSettings, spec: CompressionSpace, problem: SearchProblem, database: Database):
    """The sampler a run names: by name, or for the heuristics that read per-unit statistics gathered
    with the database (OWL, ShortGPT), an object built for this problem."""
    if settings.sampler in heuristics.HEURISTICS:
        return heuristics.for_problem(settings.sampler, problem, database.stats)
    return settings.sampler


def _sampler_options(settings: SearchSettings, spec: CompressionSpace, problem: SearchProblem) -> dict:
    """A space's sampler defaults (offspring...) are those of EvoPress, the default sampler; others take none."""
    if settings.sampler in heuristics.HEURISTICS:
        return {}
    options = (dict(spec.sampler) if settings.sampler == "evopress" else {}) | settings.sampler_options
    if settings.generations is not None and settings.sampler == "evopress":
        options["generations"] = settings.generations
    if problem.starts and settings.sampler == "evopress":
        options.setdefault("starts", problem.starts)
    return options


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


def _corpus(corpus, text, tokens, tokenizer, settings: SearchSettings) -> Corpus:
    """The run's text: a ``Corpus``, a corpus source, raw text or token ids (one of them)."""
    given = [name for name, value in (("corpus", corpus), ("text", text), ("tokens", tokens)) if value is not None]
    if len(given) > 1:
        raise EvosearchError(f"compress: give one of corpus, text and tokens, not {' and '.join(given)}")
    if isinstance(corpus, Corpus):
        return corpus
    if text is not None:
        documents = [text] if isinstance(text, str) else list(text)
        ids = tokenizer("\n\n".join(d.strip() for d in documents if d.strip()), add_special_tokens=False)["input_ids"]
        return Corpus("text", np.asarray(ids, dtype=np.int32), prefix=text_prefix(tokenizer))
    if tokens is not None:
        ids = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        return Corpus("tokens", ids.reshape(-1).astype(np.int32))
    return load_corpus(corpus if corpus is not None else settings.corpus, tokenizer, text_field=settings.text_field)


def _draws(settings: SearchSettings) -> dict[str, Draw]:
    from evosearch.run import default_draws

    return default_draws(settings)


def _starts(corpus: Corpus, draw: Draw) -> list[int]:
    return [int(s) for s in corpus.calibration_starts(draw.sequences, draw.length, draw.seed)]


def worker_fitness(options: dict, device: str | None = None) -> KLFitness:
    """The KL fitness of the search that `options` (its `SearchSettings`) describe, built in a
    worker process on `device` (default: the search's).

    The worker only reads the database: the search builds it before it queues any
    evaluation, and many workers must not build one database at once.
    """
    settings = SearchSettings(**options)
    spec = CompressionSpace.load(settings.space)
    model, tokenizer = load_model(settings.model, device=device or settings.device, dtype=settings.dtype)
    arch = architecture(model)
    problem, _ = search_problem(settings, spec, arch)
    corpus = load_corpus(settings.corpus, tokenizer, text_field=settings.text_field, vocab_size=vocab_size(model))
    database = open_database(settings, problem, model_fingerprint(model), corpus)
    missing = [f"{unit}/{key}" for unit in problem.model_units for key in needed_entries(problem, unit)
               if not database.has(unit, key)]
    if missing:
        raise EvosearchError(f"database {database.root} lacks {len(missing)} entries (such as {missing[0]}); "
                             f"workers read the search's database: on another host, give them its folder "
                             f"(--database on a shared file system)")
    draw = _draws(settings)["fitness"]
    teacher = Teacher.build(model, corpus.calibration_sequences(draw.sequences, draw.length, seed=draw.seed),
                            top_k=settings.top_k, progress=False)
    return KLFitness(CandidateModel(model, arch, problem, database), teacher, compile_blocks=_compile(settings, model),
                     fidelities=sorted(settings.fidelities))


def _gpus() -> list[str]:
    """One device per local worker, round robin: the visible GPUs, else the CPU."""
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]


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


def _measure(candidate: CandidateModel, teacher: Teacher, windows: torch.Tensor, tokenizer, progress: bool) -> dict:
    """KL to the dense model and held-out perplexity of the candidate as it is."""
    measured = perplexity(candidate.model, windows, tokenizer=tokenizer, progress=progress)
    return {"kl": teacher.kl(candidate.model), "perplexity": measured.perplexity, "tokens": measured.tokens}


def _refine(problem: SearchProblem, candidate: CandidateModel, teacher: Teacher, calibration: torch.Tensor,
            windows: torch.Tensor, tokenizer, evaluated: dict, progress: bool) -> dict:
    """Let the kind improve the levels in place (a width search's reformation) and measure again: the
    KL and perplexity after, and a ``reformation`` record of both. Nothing to refine: ``evaluated``."""
    started = time.perf_counter()
    record = problem.compression.refine(problem, candidate, calibration, progress=progress)
    if record is None:
        return evaluated
    seconds = time.perf_counter() - started
    after = _measure(candidate, teacher, windows, tokenizer, progress)
    record |= {"kl_before": evaluated["kl"], "kl_after": after["kl"], "perplexity_before": evaluated["perplexity"],
               "perplexity_after": after["perplexity"], "seconds": round(seconds, 1)}
    return after | {"reformation": record}


def _baseline(name: str, settings: SearchSettings, spec: CompressionSpace, problem: SearchProblem, database: Database,
              fitness: KLFitness, candidate: CandidateModel, windows: torch.Tensor, tokenizer,
              calibration: torch.Tensor, progress: bool) -> BaselineRecord:
    """A baseline sampler's answer on the same database, fitness and held-out text."""
    sampler = heuristics.for_problem(name, problem, database.stats) if name in heuristics.HEURISTICS else name
    result = search(problem.space, fitness, problem.budget, sampler=sampler, seed=0, progress=False)
    candidate.apply(result.best.assignment)
    evaluated = _measure(candidate, fitness.teacher, windows, tokenizer, progress)
    refined = _refine(problem, candidate, fitness.teacher, calibration, windows, tokenizer, evaluated, progress)
    record = {"kl": refined["kl"], "perplexity": refined["perplexity"],
              "usage": problem.budget.usage(problem.space, result.best.assignment),
              "assignment": result.best.assignment}
    if "reformation" in refined:
        record["reformation"] = refined["reformation"]
    return BaselineRecord(**record)


def open_database(settings: SearchSettings, problem: SearchProblem, fingerprint: str, corpus: Corpus) -> Database:
    """The database of a run: its folder in the cache is keyed by everything its entries depend on."""
    identity = {"model": fingerprint} | problem.compression.database_identity() | {
        "corpus": hashlib.sha256(corpus.calibration.tobytes()).hexdigest()[:16],
        "sequences": settings.calibration_sequences, "length": settings.sequence_length,
        "seed": settings.seed, "dtype": str(settings.dtype)}
    root = Path(settings.database) if settings.database else (
        assets.cache_dir() / "databases" / hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16])
    return Database(root, identity=identity)


def _dense_perplexity(model, tokenizer, windows: torch.Tensor, fingerprint: str, corpus: Corpus) -> float:
    """The dense model's perplexity, cached: it is the same for every search on that model and text."""
    key = hashlib.sha256(fingerprint.encode() + windows.numpy().tobytes()).hexdigest()[:16]
    path = assets.cache_dir() / "evaluations" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())["perplexity"]
    value = perplexity(model, windows, tokenizer=tokenizer).perplexity
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"perplexity": value, "corpus": corpus.name}))
    return value
