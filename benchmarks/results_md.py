"""benchmarks/RESULTS.md: each benchmark owns sections between ``<!-- tag:begin -->`` and
``<!-- tag:end -->``; a new run replaces its section, or appends it the first time."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"


def replace_section(tag: str, section: str) -> None:
    """Write ``section`` (which starts and ends with the tag's markers) into RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    pattern = rf"<!-- {re.escape(tag)}:begin -->.*<!-- {re.escape(tag)}:end -->"
    if re.search(pattern, text, flags=re.S):
        text = re.sub(pattern, lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)
