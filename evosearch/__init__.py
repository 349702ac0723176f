"""evosearch: search per-layer compression of causal language models under one budget."""

import logging

from evosearch.errors import EvosearchError

__version__ = "0.1.0"

from evosearch.space import Budget, Space, Unit  # noqa: E402  (after __version__, which engine reads)
from evosearch.engine import SearchResult, search  # noqa: E402

logging.getLogger("evosearch").addHandler(logging.NullHandler())

__all__ = ["EvosearchError", "__version__"]
__all__ += ["Space", "Unit", "Budget", "search", "SearchResult"]
