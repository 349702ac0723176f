"""The package's version, and the versions of what a run depended on (recorded in its result)."""

from __future__ import annotations

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    import platform

    import numpy as np
    import optuna
    import torch
    import transformers

    return {"evosearch": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "optuna": optuna.__version__, "numpy": np.__version__, "python": platform.python_version()}
