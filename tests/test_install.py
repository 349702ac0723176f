"""A checkout must not shadow other distributions when Python runs from its root.

``python -m evosearch`` and ``python -m pytest`` put the current folder first on
``sys.path``. A regular package there (a folder with ``__init__.py``) named like a PyPI
distribution wins over the installed one for every library that imports it:
transformers 5.25 imports the PyPI package ``kernels``, and this repository's
``kernels/`` once broke both README commands that way. The folders beside ``evosearch/``
are therefore namespace folders (no ``__init__.py``), which Python takes only when no
regular package of that name exists anywhere on the path.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [("-m", "evosearch", "--help"), ("-c", "from transformers import LlamaConfig")],
                         ids=["evosearch-help", "transformers-import"])
def test_runs_from_the_repository_root(args):
    done = run_from_root(*args)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]


def test_no_folder_or_module_at_the_root_is_importable_as_a_regular_package():
    names = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier() and p.name != "evosearch")
    names += sorted(p.stem for p in ROOT.glob("*.py"))
    assert "kernels" in names and "spaces" in names  # the folders this guards are there
    probe = ("import importlib.util, json, sys\n"
             "found = {}\n"
             "for name in sys.argv[1:]:\n"
             "    spec = importlib.util.find_spec(name)\n"
             "    found[name] = spec.origin if spec is not None and spec.has_location else None\n"
             "print(json.dumps(found))")
    done = run_from_root("-c", probe, *names)
    assert done.returncode == 0, done.stderr
    import json

    shadowing = {name: origin for name, origin in json.loads(done.stdout).items()
                 if origin is not None and Path(origin).resolve().is_relative_to(ROOT)}
    assert not shadowing, (f"{shadowing}: importable from the repository root as regular packages or modules, so "
                           f"they hide any installed distribution of that name; remove their __init__.py")
