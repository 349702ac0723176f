"""Samplers: the strategies that choose which assignments to evaluate.

A sampler is an object (``evosearch.samplers.base.Sampler``) whose ``run(ctx)`` drives a
search; ``base`` holds the protocol it sees. ``search(..., sampler=...)`` takes a sampler
object, or one of the names in ``SAMPLERS`` with its options (``make_sampler``). The
heuristics that read per-unit statistics of a model (OWL, ShortGPT) are objects built for
one problem (``heuristics.for_problem``), never entries of a shared table.
"""

from __future__ import annotations

from typing import Callable

from evosearch.errors import EvosearchError
from evosearch.samplers.base import Context, Sampler, SearchStopped
from evosearch.samplers.baselines import DP, Uniform
from evosearch.samplers.evopress import EvoPress
from evosearch.samplers.heuristics import HEURISTICS
from evosearch.samplers.optuna_samplers import NSGAII, OptunaSampler

SAMPLERS: dict[str, Callable[..., Sampler]] = {
    "evopress": EvoPress,
    "uniform": Uniform,
    "dp": DP,
    "nsga2": NSGAII,
    **{kind: (lambda _k: lambda **options: OptunaSampler(_k, **options))(kind)
       for kind in ("tpe", "cmaes", "gp", "random")},
}


def register(name: str, factory: Callable[..., Sampler]) -> None:
    """Make ``factory(**sampler_options)`` available as ``search(..., sampler=name)`` (a sampler of your own,
    registered once; samplers built for one problem are passed as objects instead)."""
    SAMPLERS[name] = factory


def make_sampler(name: str, options: dict) -> Sampler:
    """The sampler ``name`` with ``options``."""
    if name in HEURISTICS:
        raise EvosearchError(f"sampler {name!r} reads per-unit statistics of a model; build it with "
                             f"evosearch.samplers.heuristics.for_problem(...) and pass the object")
    if name not in SAMPLERS:
        raise EvosearchError(f"unknown sampler {name!r}; choose one of {sorted([*SAMPLERS, *HEURISTICS])}")
    try:
        return SAMPLERS[name](**options)
    except TypeError as e:
        raise EvosearchError(f"sampler {name!r}: bad sampler_options: {e}") from None


__all__ = ["SAMPLERS", "register", "make_sampler", "Sampler", "Context", "SearchStopped", "EvoPress", "Uniform", "DP",
           "OptunaSampler", "NSGAII"]
