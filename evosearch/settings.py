"""A run's settings as data: everything that determines a search's result (``SearchSettings``).

The command line, recipes (``evosearch.recipe``) and ``result.json`` all say the same thing
through this one model, so a run is reproducible from any of them.
"""

from __future__ import annotations

import inspect

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evosearch.errors import EvosearchError


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
        own sampler defaults are EvoPress's too, but the search passes them to EvoPress only.)"""
        from evosearch.samplers import SAMPLERS, make_sampler
        from evosearch.samplers.evopress import EvoPress
        from evosearch.samplers.optuna_samplers import OptunaSampler

        if self.sampler != "evopress":
            given = ["generations"] * (self.generations is not None) + list(self.sampler_options)
            evopress_only = [name for name in given if name in inspect.signature(EvoPress).parameters]
            if evopress_only:
                raise EvosearchError(f"--{evopress_only[0].replace('_', '-')} applies to --sampler evopress only "
                                     f"(this search uses {self.sampler}); drop it")
        if self.sampler not in SAMPLERS:  # the heuristics are built per problem, and a name may be unknown
            return self
        sampler = make_sampler(self.sampler, self.sampler_options)  # a bad option fails here, not after the database
        if isinstance(sampler, OptunaSampler) and self.trials is None:
            raise EvosearchError(f"--sampler {self.sampler} needs --trials N: the number of candidates it evaluates")
        return self
