"""Where compressed weights live: one entry per (unit, level key), built once, read many times.

On disk an entry is a safetensors file ``<root>/<unit>/<key>.safetensors`` holding the
unit's compressed tensors by parameter name, read memory-mapped; a small ``database.json``
records what the entries were built from, so a database built for another model or
calibration set is never used by mistake. Without a root everything stays in memory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from evosearch.errors import EvosearchError

log = logging.getLogger("evosearch")


class Database:
    def __init__(self, root: str | Path | None = None, identity: dict | None = None):
        """Open (or create) a database; ``identity`` describes what its entries were built from."""
        self.root = Path(root) if root is not None else None
        self.identity = identity or {}
        self._memory: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self.stats: dict[str, dict[str, float]] = {}  # per-unit statistics gathered while building (OWL, ShortGPT)
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            meta = self.root / "database.json"
            if meta.exists():
                try:
                    record = json.loads(meta.read_text())
                except json.JSONDecodeError:
                    raise EvosearchError(f"{meta} is corrupt; delete the folder {self.root} to rebuild") from None
                if identity is not None and record.get("identity") != identity:
                    raise EvosearchError(f"database {self.root} was built for another model, method or calibration "
                                         f"set; use another --database folder or delete it")
                self.identity = record.get("identity", {})
                self.stats = record.get("stats", {})
            else:  # written once: workers open one database at the same time
                self._save_meta()

    def _path(self, unit: str, key: str) -> Path:
        return self.root / unit / f"{key}.safetensors"

    def has(self, unit: str, key: str) -> bool:
        if self.root is None:
            return (unit, key) in self._memory
        return self._path(unit, key).exists()

    def put(self, unit: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.root is None:
            self._memory[(unit, key)] = {name: t.detach().clone() for name, t in tensors.items()}
            return
        path = self._path(unit, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(partial))
        os.replace(partial, path)  # an interrupted build never leaves a half-written entry

    def get(self, unit: str, key: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        if self.root is None:
            return self._memory[(unit, key)]
        path = self._path(unit, key)
        try:
            return load_file(str(path), device=str(device))
        except FileNotFoundError:
            raise EvosearchError(f"database {self.root} has no entry {unit}/{key}; build it again") from None
        except SafetensorError:
            raise EvosearchError(f"database entry {path} is corrupt; delete it to rebuild") from None

    def save_stats(self) -> None:
        """Write ``stats`` (filled in place while building) next to the entries."""
        self._save_meta()

    def _save_meta(self) -> None:
        if self.root is not None:
            meta = self.root / "database.json"
            meta.with_suffix(".partial").write_text(json.dumps({"identity": self.identity, "stats": self.stats},
                                                                indent=1))
            os.replace(meta.with_suffix(".partial"), meta)
