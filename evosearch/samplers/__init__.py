"""Samplers: the strategies that choose which assignments to evaluate.

A sampler is an object with one method, ``run(ctx)``, that drives a search: it
proposes assignments and asks ``ctx.evaluator`` to score them, closing each
candidate's trial with ``prune`` or ``complete``. It keeps no state of its own beyond
its options; everything it learns is in the study, and every random choice comes
from ``ctx.rng(step)``, so a resumed search replays it (see `evosearch.engine`).

Samplers are registered by name in `SAMPLERS`; other modules add theirs with
`register`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from evosearch.errors import EvosearchError

if TYPE_CHECKING:
    from evosearch.engine import Context


class Sampler:
    """Base class of samplers. `tradeoff` is set by multi-objective samplers:
    (resource, "minimize" or "maximize"), the resource traded off against fitness."""

    tradeoff: tuple[str, str] | None = None

    def run(self, ctx: Context) -> None:
        raise NotImplementedError


SAMPLERS: dict[str, Callable[..., Sampler]] = {}


def register(name: str, factory: Callable[..., Sampler]) -> None:
    """Make `factory(**sampler_options)` available as ``search(..., sampler=name)``."""
    SAMPLERS[name] = factory


def make_sampler(name: str, options: dict) -> Sampler:
    if name not in SAMPLERS:
        raise EvosearchError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    try:
        return SAMPLERS[name](**options)
    except TypeError as e:
        raise EvosearchError(f"sampler {name!r}: bad sampler_options: {e}") from None


from evosearch.samplers import baselines, evopress, optuna_samplers  # noqa: E402, F401  (they register themselves)
