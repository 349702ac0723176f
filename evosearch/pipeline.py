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
    study.db       every evaluated candidate (an Optuna study; ``--resume`` continues it)

``SearchSettings`` is the whole run as data, so a run is reproducible from its
``result.json`` alone (``evosearch run DIR/result.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from evosearch import __version__, assets
from evosearch.candidate import CandidateModel
from evosearch.compression import CompressionSpace, SearchProblem
from evosearch.data import load_corpus
from evosearch.database.build import build_database
from evosearch.database.store import Database
from evosearch.engine import search
from evosearch.errors import EvosearchError
from evosearch.evaluate import Teacher, perplexity
from evosearch.fitness import KLFitness
from evosearch.model import load_model, model_fingerprint
from evosearch.units import architecture

log = logging.getLogger("evosearch")


class SearchSettings(BaseModel):
    """Everything that determines a search's result."""

    model_config = ConfigDict(extra="forbid")

    space: str = "sparsity"
    budget: float
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
    eval_tokens: int = Field(8192, ge=1)
    device: str | None = None
    dtype: str | None = None
    database: str | None = Field(None, description="database folder (default: in the cache, keyed by its inputs)")
    storage: str | None = Field(None, description="Optuna storage URL (default: out/study.db)")
    baselines: list[str] | None = Field(None, description="baselines to report beside the search (default: the space's)")


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
               progress: bool = True) -> dict:
    from evosearch.recipe import Recipe  # the recipe module builds on SearchSettings

    out = Path(out)
    prepare_output(out, resume, force)
    recipe = Recipe.from_settings(settings, out)
    # A resumed run keeps the files of the run it continues until it finishes: were these settings
    # refused (another seed, say), the folder would otherwise describe a search it does not hold.
    _write_unless_resumed(out / "recipe.yaml", recipe.to_yaml(), resume)
    clock = _Stopwatch()

    spec = CompressionSpace.load(settings.space)
    model, tokenizer = load_model(settings.model, device=settings.device, dtype=settings.dtype)
    arch = architecture(model)
    problem = spec.materialize(arch, settings.budget)
    _write_unless_resumed(out / "space.yaml", f"# {spec.name or 'search'} space for this model and budget "
                          f"{settings.budget:g}: each unit's levels and their resources\n" + problem.space.to_yaml(),
                          resume)
    corpus = load_corpus(settings.corpus, tokenizer, text_field=settings.text_field)
    fitness_sequences = math.ceil(max(settings.fidelities) / settings.sequence_length)
    fitness_tokens = corpus.calibration_sequences(fitness_sequences, settings.sequence_length, seed=settings.seed + 1)
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
    fitness = KLFitness(candidate, teacher)
    fitness.fidelities = sorted(settings.fidelities)
    # A space's sampler defaults (offspring...) are those of EvoPress, the default sampler; others take none of them.
    sampler_options = (dict(spec.sampler) if settings.sampler == "evopress" else {}) | settings.sampler_options
    if settings.generations is not None and settings.sampler == "evopress":
        sampler_options["generations"] = settings.generations
    _register_heuristics(problem, database)
    result = search(problem.space, fitness, problem.budget, sampler=settings.sampler, n_trials=settings.trials,
                    seed=settings.seed, storage=settings.storage or f"sqlite:///{(out / 'study.db').resolve()}",
                    study_name=f"evosearch-{spec.name or 'search'}", resume=resume,
                    sampler_options=sampler_options, progress=progress)
    clock.lap("search")

    baselines = {}
    for name in spec.baselines if settings.baselines is None else settings.baselines:
        baselines[name] = _evaluate_baseline(name, problem, fitness, candidate, eval_windows, tokenizer, progress)
    clock.lap("baselines")

    best = result.best.assignment
    candidate.apply(best)
    final_kl = teacher.kl(model)
    compressed = perplexity(model, eval_windows, tokenizer=tokenizer, progress=progress)
    clock.lap("evaluate")
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    report = {
        "settings": settings.model_dump(),
        "space": {"name": spec.name, "description": spec.description, "units": len(problem.space.units)},
        "budget": {"resource": problem.budget.resource, "label": problem.budget.label, "value": settings.budget,
                   "planned": problem.budget.usage(problem.space, best),
                   "measured": measured_usage(model, arch, problem)},
        "assignment": best,
        "fitness": {"kl": final_kl, "tokens": teacher.max_tokens, "search_value": result.best.value},
        "perplexity": {"corpus": corpus.name, "tokens": compressed.tokens, "dense": dense_ppl,
                       "compressed": compressed.perplexity},
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
    (out / "result.json").write_text(json.dumps(report, indent=1))
    (out / "recipe.yaml").write_text(recipe.to_yaml())
    return report


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


def _evaluate_baseline(name: str, problem: SearchProblem, fitness: KLFitness, candidate: CandidateModel,
                       eval_windows: torch.Tensor, tokenizer, progress: bool) -> dict:
    """A baseline sampler's answer on the same database, fitness and held-out text."""
    result = search(problem.space, fitness, problem.budget, sampler=name, seed=0, progress=False)
    candidate.apply(result.best.assignment)
    ppl = perplexity(candidate.model, eval_windows, tokenizer=tokenizer, progress=progress)
    return {"kl": fitness.teacher.kl(candidate.model), "perplexity": ppl.perplexity,
            "assignment": result.best.assignment}


def _open_database(settings: SearchSettings, problem: SearchProblem, fingerprint: str, corpus) -> Database:
    comp = problem.spec.compression
    identity = {"model": fingerprint, "compression": comp.kind, "method": getattr(comp, "method", None),
                "corpus": hashlib.sha256(corpus.calibration.tobytes()).hexdigest()[:16],
                "sequences": settings.calibration_sequences, "length": settings.sequence_length,
                "seed": settings.seed, "dtype": str(settings.dtype)}
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


def measured_usage(model, arch, problem: SearchProblem) -> float:
    """The budget's resource counted from the model's weights, not from the plan."""
    resource = problem.budget.resource
    if resource == "sparsity":
        zeros = sum(int((arch.module(u).weight == 0).sum()) for u in problem.model_units)
        return zeros / sum(arch.module(u).weight.numel() for u in problem.model_units)
    if resource == "dropped":
        return float(sum(is_dropped(arch, mu) for mu in problem.model_units.values()))
    raise EvosearchError(f"no way to count {resource!r} from weights")


def is_dropped(arch, mu) -> bool:
    """A block is dropped when its output projection is all zeros."""
    outputs = {"attention": [arch.attention_linears(mu.block)[1]], "mlp": [arch.mlp_linears(mu.block)[1]],
               "block": [arch.attention_linears(mu.block)[1], arch.mlp_linears(mu.block)[1]]}[mu.kind]
    return all(not arch.module(name).weight.any() for name in outputs)


def kept_parameters(model, arch, problem: SearchProblem) -> int:
    """Non-zero parameters left in the searched units (a dropped block keeps none)."""
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
