"""The fitness that test workers run (``--fitness workers_fitness:fitness``): evosearch.testing's
slow synthetic fitness, which also logs every call to a file and can misbehave on cue:

- ``kill_at``: the call that brings the log to this many lines (over all workers) kills its
  own process with SIGKILL, once;
- ``raise_at``: every call at this fidelity raises.
"""

import os
import signal

from evosearch.engine import FunctionFitness
from evosearch.testing import slow_fitness


def fitness(options: dict, device: str | None = None):
    inner = slow_fitness(options)

    def call(assignment, fidelity=None):
        with open(options["log"], "a") as log:
            log.write(f"{os.getpid()} {fidelity}\n")
        if "raise_at" in options and fidelity == options["raise_at"]:
            raise ValueError(f"no value at fidelity {fidelity}")
        if options.get("kill_at") and sum(1 for _ in open(options["log"])) >= options["kill_at"]:
            try:
                os.close(os.open(options["log"] + ".killed", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return inner(assignment, fidelity)

    return FunctionFitness(call, inner.fidelities)
