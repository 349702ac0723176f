"""evosearch: search per-layer compression of causal language models under one budget."""

import logging

from evosearch.errors import EvosearchError

__version__ = "0.1.0"

logging.getLogger("evosearch").addHandler(logging.NullHandler())

__all__ = ["EvosearchError", "__version__"]
