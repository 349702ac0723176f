"""A recipe: one YAML file that captures a whole run, so ``evosearch run recipe.yaml`` repeats it.

A recipe is the run's `SearchSettings` (model, space, budget, sampler, fitness and
evaluation settings: everything that determines the result) plus what lies outside
them: where the output goes (``out``). Its fields are the settings' fields, named as
the ``evosearch search`` options are (``--sequence-length`` is ``sequence_length``)::

    space: sparsity
    budget: 0.5
    sampler: evopress
    generations: 20
    seed: 0
    out: runs/sparsity-50

``run_search`` writes the full recipe (every field, defaults included) into its
output folder as ``recipe.yaml`` when a search starts and under ``recipe`` in
``result.json`` when it ends, so either file repeats the run, or resumes it when it
was interrupted::

    evosearch run runs/sparsity-50/result.json --out runs/again
    evosearch run runs/sparsity-50/recipe.yaml --resume

Relative paths (``out``, ``model``, ``corpus``, ``database``) are read from the
current directory, as on the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from evosearch.errors import EvosearchError, first_problem
from evosearch.settings import SearchSettings


class Recipe(SearchSettings):
    """A whole run: the search settings and the output folder."""

    out: str | None = Field(None, description="folder for result.json, model/ and study.journal (or --out)")

    @property
    def settings(self) -> SearchSettings:
        return SearchSettings(**self.model_dump(include=set(SearchSettings.model_fields)))

    @classmethod
    def from_settings(cls, settings: SearchSettings, out: str | Path | None) -> Recipe:
        return cls(**settings.model_dump(), out=None if out is None else str(out))

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """A recipe from a YAML file, or from the ``recipe`` of a run's ``result.json``."""
        path = Path(path)
        if path.is_dir():
            raise EvosearchError(f"{path} is a folder; pass its recipe.yaml or result.json")
        try:
            text = path.read_text()
        except OSError as exc:
            raise EvosearchError(f"recipe {path}: cannot read it ({exc.strerror})") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            kind = "JSON" if path.suffix == ".json" else "YAML"
            raise EvosearchError(f"recipe {path} is not valid {kind}: {str(exc).splitlines()[0]}") from None
        if isinstance(data, dict) and "recipe" in data:  # a result.json
            data = data["recipe"]
        elif isinstance(data, dict) and "settings" in data and "assignment" in data:  # result.json of evosearch 0.1
            data = data["settings"]
        if not isinstance(data, dict):
            raise EvosearchError(f"recipe {path}: expected a mapping of settings such as 'space: sparsity' and "
                                 f"'budget: 0.5'")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problem = first_problem(exc)
            if problem.endswith(": unknown field"):
                problem += f"; the fields are {', '.join(cls.model_fields)}"
            raise EvosearchError(f"recipe {path}: {problem}") from None

    def to_yaml(self) -> str:
        header = "# evosearch recipe: `evosearch run THIS_FILE` repeats the run (--out DIR to write elsewhere)\n"
        return header + yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
