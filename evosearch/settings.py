"""A run's settings as data: everything that determines a search's result (``SearchSettings``).

The command line, recipes (``evosearch.recipe``) and ``result.json`` all say the same thing
through this one model, so a run is reproducible from any of them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
