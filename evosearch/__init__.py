"""evosearch: search per-layer compression of causal language models under one budget."""

import logging
from pathlib import Path

# In a source checkout, kernels/ and spaces/ sit beside this package, and pyproject.toml's
# package-dir maps them to evosearch.kernels and evosearch.spaces when installed. Look for them
# there too, so that a checkout run with PYTHONPATH=. imports its own copies (and not those of
# another checkout that is pip-installed in editable mode). Neither folder has an __init__.py:
# Python runs from the checkout's root with that root first on sys.path, and a regular package
# there named `kernels` (or `spaces`, `tests`, `benchmarks`) would shadow the PyPI distribution
# of that name for every library that imports it (transformers imports `kernels`). A folder
# without __init__.py is a namespace portion, which loses to any regular package found later on
# the path (tests/test_install.py).
if (Path(__file__).resolve().parent.parent / "pyproject.toml").is_file():
    __path__.append(str(Path(__file__).resolve().parent.parent))

from evosearch.engine import FunctionFitness, SearchResult, search  # noqa: E402
from evosearch.errors import EvosearchError  # noqa: E402
from evosearch.space import Budget, Space, Unit  # noqa: E402
from evosearch.version import __version__  # noqa: E402


def __getattr__(name: str):
    # evosearch.compress is the main job (evosearch.pipeline), loaded on first use: importing it brings
    # torch and transformers, which `import evosearch` for a plain search does not need.
    if name == "compress":
        from evosearch.pipeline import compress

        return compress
    raise AttributeError(f"module 'evosearch' has no attribute {name!r}")


logging.getLogger("evosearch").addHandler(logging.NullHandler())

__all__ = ["EvosearchError", "__version__", "Space", "Unit", "Budget", "search", "SearchResult", "FunctionFitness",
           "compress"]
