"""A run: its typed result (``RunResult``) and the folder that holds it (``RunFolder``).

``evosearch search --out DIR`` writes, through ``RunFolder``, the one owner of that layout:

    recipe.yaml      the run as a recipe (``evosearch.recipe``), written when it starts, so even an
                     interrupted search says how to resume it
    space.yaml       the search space made concrete for this model and budget (an ``evosearch.Space``)
    result.json      the ``RunResult``: settings, space, the chosen level of every unit (typed), the
                     budget planned and counted, KL and perplexity, baselines, the search's history,
                     the calibration windows it drew, timings and versions
    model/           the compressed model (``save_pretrained``) and its tokenizer
    study.journal    every evaluated candidate (an Optuna study; earlier runs kept it in study.db)
    .lock            held by the process that works in the folder (``RunFolder.lock``)
    healed/, heal-checkpoint/, export-FORMAT/   written later by heal and export

Every file is written whole or not at all (a temporary file, then a rename). Export, heal,
show and report read what the search recorded here; none of them rebuilds the problem or
re-derives the calibration draws. ``result.json`` files of earlier versions lack some of
it; ``RunResult.load`` reads them, and what they lack is derived once, here
(``levels_for``, ``draws``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from evosearch.errors import EvosearchError
from evosearch.kinds import Level, level_from_json
from evosearch.settings import SearchSettings

log = logging.getLogger("evosearch")

RESULT = "result.json"
RECIPE = "recipe.yaml"
SPACE = "space.yaml"
MODEL = "model"
LOCK = ".lock"
RUN_FILES = {RECIPE, SPACE, "study.journal", "study.db"}  # what a run writes before it evaluates

# Settings a resumed run may change, as they leave its result as it was: how long it runs (trials,
# generations: resuming to run longer is the point; a shorter run reports the best the study holds),
# where it runs (device, compile: the same computation on other hardware or fused, as workers on
# devices of their own already do; workers: EvoPress takes the same path on any number of them),
# where the database is kept (it refuses to serve another model or calibration) and which baselines
# are reported beside it. Every other setting changes what is searched or measured.
MAY_CHANGE_ON_RESUME = {"trials", "generations", "device", "compile", "workers", "database", "baselines"}


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")  # a later version's fields survive a round trip


class BudgetRecord(_Record):
    resource: str
    label: str
    value: float
    planned: float
    measured: float | None = None  # counted from the weights (None: measured on the export, not here)
    whole_model_planned: float | None = None  # a hardware budget: the units' plan plus the rest of the model
    target: str | None = None


class Draw(BaseModel):
    """Calibration windows: ``sequences`` of ``length`` tokens from the corpus's calibration part,
    starting at ``starts`` (drawn with ``seed``)."""

    model_config = ConfigDict(extra="forbid")

    sequences: int
    length: int
    seed: int
    starts: list[int] | None = None


class BaselineRecord(_Record):
    kl: float
    perplexity: float
    usage: float
    assignment: dict[str, Any]
    reformation: dict[str, Any] | None = None


class SearchRecord(_Record):
    sampler: str
    evaluations: int
    seconds: float  # over every run of the search (a resumed one: interrupted runs too)
    runs: int = 1
    best_trial: int
    study: str
    pareto: list[dict] = Field(default_factory=list)
    history: list[dict] | None = None  # complete candidates in completion order (``engine.History``)


class RunResult(_Record):
    """What a search found and how (see the module docstring); ``result.json`` holds it as JSON."""

    settings: SearchSettings
    space: dict[str, Any]  # name, description, units, compression; budget, sampler, baselines since 0.2
    budget: BudgetRecord
    database: str | None = None
    assignment: dict[str, Any]  # unit -> level label of the searched space
    levels: dict[str, SerializeAsAny[Level]] | None = None  # unit -> its typed level (None: before 0.2)
    fitness: dict[str, Any]
    perplexity: dict[str, Any]
    baselines: dict[str, BaselineRecord] = Field(default_factory=dict)
    parameters: dict[str, int]
    search: SearchRecord
    draws: dict[str, Draw] | None = None  # "database" (Hessians), "fitness": the calibration windows used
    timings: dict[str, float] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    recipe: dict[str, Any] | None = None
    # The kinds' own sections (``Compression.record``, ``refine``) and healing's:
    quantization: dict[str, Any] | None = None
    formats: dict[str, dict] | None = None
    reformation: dict[str, Any] | None = None
    widths: dict[str, dict] | None = None
    heal: dict[str, Any] | None = None

    @field_validator("levels", mode="before")
    @classmethod
    def _typed(cls, value):
        if value is None:
            return None
        levels = {}
        for unit, level in value.items():
            try:
                levels[unit] = level if isinstance(level, Level) else level_from_json(level)
            except ValidationError as exc:  # name the unit: the level alone does not say where it was
                error = exc.errors()[0]
                raise ValueError(f"{unit}.{'.'.join(map(str, error['loc']))}: {error['msg']}") from None
        return levels

    def to_json(self) -> str:
        data = {k: v for k, v in self.model_dump(mode="json").items() if v is not None}  # sections absent, not null
        if self.levels is not None:
            data["levels"] = {unit: level.to_json() for unit, level in self.levels.items()}
        return json.dumps(data, indent=1)

    @classmethod
    def load(cls, path: str | Path) -> RunResult:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EvosearchError(f"{path} is not valid JSON ({exc.msg}); the run may have been cut off while "
                                 f"writing it: delete it and resume the search") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            raise EvosearchError(f"{path}: {where}: {message} (not a result.json evosearch can read)") from None

    def space_spec(self):
        """The compression space the search ran (recorded whole since 0.2; by name before)."""
        from evosearch.compression import CompressionSpace

        if "budget" in self.space and "compression" in self.space:
            return CompressionSpace.parse({k: v for k, v in self.space.items() if k != "units"}, "result.json space")
        spec = CompressionSpace.load(self.settings.space)
        if self.space.get("compression") and spec.compression.model_dump() != self.space["compression"]:
            raise EvosearchError(f"result.json of evosearch < 0.2 names space {self.settings.space!r}, whose file has "
                                 f"changed since; search again to export this result")
        return spec

    def levels_for(self, arch) -> dict[str, Level]:
        """Each searched unit's typed level: as recorded, or for a result of evosearch < 0.2 rebuilt
        from its space, budget and assignment (the one place that still does)."""
        if self.levels is not None:
            return dict(self.levels)
        spec = self.space_spec()
        s = self.settings
        problem = spec.materialize(arch, s.budget if s.budget_resource is None else None)
        return problem.typed(self.assignment)

    def calibration_draws(self) -> dict[str, Draw]:
        """The calibration windows the search drew: for the database's Hessians and for the fitness."""
        if self.draws is not None:
            return dict(self.draws)
        return default_draws(self.settings)


def default_draws(settings: SearchSettings) -> dict[str, Draw]:
    """The draws ``evosearch.pipeline`` makes for these settings (their starts left to the corpus)."""
    length = settings.sequence_length
    return {"database": Draw(sequences=settings.calibration_sequences, length=length, seed=settings.seed),
            "fitness": Draw(sequences=math.ceil(max(settings.fidelities) / length), length=length,
                            seed=settings.seed + 1)}


class RunFolder:
    """The files of one run (module docstring), written atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def result_path(self) -> Path:
        return self.path / RESULT

    @property
    def model_path(self) -> Path:
        return self.path / MODEL

    def has_result(self) -> bool:
        return self.result_path.exists()

    def study_storage(self) -> str:
        """The study of a search folder: a journal file (each evaluation is appended in a few
        milliseconds, where SQLite through Optuna's ORM took tens: on a fast fitness that was
        most of a generation's time), or the ``study.db`` of a search started before."""
        earlier = self.path / "study.db"
        if earlier.exists():
            return f"sqlite:///{earlier.resolve()}"
        return str((self.path / "study.journal").resolve())

    def has_study(self) -> bool:
        return (self.path / "study.journal").exists() or (self.path / "study.db").exists()

    def study(self) -> str | None:
        """The study the search wrote here, if it wrote one."""
        return self.study_storage() if self.has_study() else None

    @contextmanager
    def lock(self, name: str | None = None):
        """Hold the folder (created if needed) for this process: a second search, resume or heal there is
        refused in one line, where it would otherwise break the first's study and files. An OS lock on
        ``.lock`` (flock), so it ends with the process however that ends; the file says who holds it. The
        file stays: deleted, another process could lock a new one while a third still holds the old."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise EvosearchError(f"{name or self.path} is in use by {holder}; wait for it to end, or stop "
                                     f"it") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} on {socket.gethostname()} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            handle.flush()
            yield self

    def _entries(self) -> list[Path]:
        """What the folder holds, its lock file aside."""
        return [p for p in self.path.iterdir() if p.name != LOCK] if self.path.is_dir() else []

    def evaluated(self) -> bool:
        """Whether the folder holds a search that evaluated something: a result, or trials in its study (in
        the folder, or in the journal file its recipe names). A study in a database counts, unread: the
        engine checks what it holds."""
        import optuna

        from evosearch.engine import _storage, journal_path
        from evosearch.recipe import Recipe

        if self.has_result():
            return True
        try:
            named = Recipe.load(self.path / RECIPE).storage if (self.path / RECIPE).exists() else None
            if named is None:
                storage = self.study()
            elif journal_path(named) is not None:  # a file, here or elsewhere: read it if it was written
                storage = named if Path(journal_path(named)).exists() else None
            else:
                return True  # a database: what its study holds is for the engine to check
            return storage is not None and any(
                s.n_trials for s in optuna.get_all_study_summaries(_storage(storage), include_best_trial=False))
        except Exception:  # a recipe or study this version cannot read is not to be replaced as if empty
            return True

    def prepare(self, settings: SearchSettings, resume: bool, force: bool) -> None:
        """Refuse to overwrite a finished or interrupted search unless told to, and to resume one that is
        not there or was searched otherwise. The folder exists and this process holds its lock."""
        entries = self._entries()
        if resume:
            if not self.evaluated():
                raise EvosearchError(f"--out {self.path} holds no search to resume; drop --resume to start one")
            self._check_resumable(settings)
            return
        if entries and not force:
            if {e.name for e in entries} <= RUN_FILES and not self.evaluated():
                # A run that failed before its first evaluation (a model that would not load, say) left
                # only these: nothing is lost when they go, and the same command simply starts again.
                log.info("--out %s holds the files of a run that evaluated nothing (%s); replacing them", self.path,
                         ", ".join(sorted(e.name for e in entries)))
            else:
                what = "a finished search" if self.has_result() else "an interrupted search or other files"
                raise EvosearchError(f"--out {self.path} already holds {what}; pass --resume to continue it or "
                                     f"--force to start over")
        for entry in entries:  # all but the lock, which this process holds
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def _check_resumable(self, settings: SearchSettings) -> None:
        """Refuse to resume with settings other than the folder's recipe, before anything is loaded."""
        from evosearch.recipe import Recipe

        written = next((self.path / n for n in (RECIPE, RESULT) if (self.path / n).exists()), None)
        if written is None:
            return  # a folder from before recipes: the engine compares the settings its study stored
        before = Recipe.load(written).settings
        for field in [f for f in SearchSettings.model_fields if f not in MAY_CHANGE_ON_RESUME]:
            was, now = (self._comparable(field, getattr(s, field)) for s in (before, settings))
            if was != now:
                option = {"sampler_options": "sampler options (--offspring, recipe sampler_options)",
                          "budget_resource": "--budget RESOURCE=..."}.get(field, "--" + field.replace("_", "-"))
                raise EvosearchError(f"--resume: {self.path} was searched with {field} {_shown(was)}, this command "
                                     f"has {_shown(now)}; use the same {option} or a new --out")

    def _comparable(self, field: str, value):
        """A setting as it matters: what None stands for, and a path whatever way it is spelled."""
        from evosearch import assets
        from evosearch.data import DEFAULT_CORPUS
        from evosearch.engine import journal_path

        if field == "storage":
            value = value or self.study_storage()
            value = journal_path(value) or value
        elif value is None and field in ("model", "corpus"):
            return assets.DEFAULT_MODEL if field == "model" else DEFAULT_CORPUS
        if isinstance(value, str) and "://" not in value and Path(value).exists():
            return str(Path(value).resolve())
        return value

    def write_text_once(self, name: str, text: str, resume: bool) -> None:
        """Write a file a resumed run keeps as the run it continues wrote it."""
        if not (resume and (self.path / name).exists()):
            self.write_text(name, text)

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        os.replace(partial, path)
        return path

    def write_result(self, result: RunResult) -> Path:
        return self.write_text(RESULT, result.to_json())

    def require_result(self) -> None:
        """Refuse a folder that holds no finished search (before locking or reading it)."""
        if not self.has_result() or not self.model_path.joinpath("config.json").exists():
            raise EvosearchError(f"{self.path} is not a finished search: it needs result.json and model/ "
                                 f"(from `evosearch search --out {self.path}`)")

    def read_result(self) -> RunResult:
        self.require_result()
        return RunResult.load(self.result_path)

    def update_result(self, **sections) -> RunResult:
        """Add or replace sections of ``result.json`` (heal's, say), keeping the rest as written."""
        result = self.read_result()
        updated = result.model_copy(update=sections)
        self.write_result(updated)
        return updated


def _shown(value) -> str:
    """A setting in a message: 0.5, [512, 2048], {"offspring": 4}, unset."""
    if value is None:
        return "unset"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return f"{value:g}" if isinstance(value, float) else str(value)
