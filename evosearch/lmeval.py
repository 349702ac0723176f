"""lm-evaluation-harness tasks on an in-memory model, from local files only.

`evaluate_tasks(model, tokenizer, tasks)` wraps a loaded (perhaps just compressed)
model in lm-eval's ``HFLM`` and runs the named tasks with the network switched off:
huggingface_hub's and datasets' offline switches are on for the run, so a task whose
data is not on this machine fails at once with one line naming the missing file or
dataset, never with a download attempt.

evosearch ships one task, ``evosearch_perplexity`` (``evosearch/tasks/``): the
evaluation windows of a corpus, the very token windows ``evosearch eval`` scores,
decoded to text and written as a local JSONL file into the cache, then scored with
lm-eval's rolling log-likelihood. It reports perplexity per token, word and byte, and
bits per byte. The protocols differ in one place only: lm-eval scores every token of
a window, the first one from its prefix token (the tokenizer's BOS, else EOS), where
``evosearch eval`` (GPTQ's protocol) uses the first token as context only. On
SmolLM2-135M and 8,192 Brown tokens that moves perplexity by 0.15%.

Any other task runs from a local copy of its data through a task YAML of one's own
(``dataset_path: json`` and ``dataset_kwargs: {data_files: ...}``) in a folder passed as
``task_paths`` (lm-eval's ``include_path``); ``docs/lm-eval.md`` shows how.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from evosearch import assets
from evosearch.errors import EvosearchError
from evosearch.evaluate import default_batch_size

log = logging.getLogger("evosearch")

PERPLEXITY_TASK = "evosearch_perplexity"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
_OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def evaluate_tasks(model, tokenizer, tasks: list[str], *, windows: torch.Tensor | None = None,
                   task_paths: list[str | Path] = (), limit: int | None = None,
                   batch_size: int | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on ``model`` offline; returns ``{task: {metric: value}}``.

    Args:
        tasks: lm-eval task or group names, or paths of task YAML files.
        windows: the token windows ``evosearch_perplexity`` scores (required for that task).
        task_paths: folders of task YAML files (lm-eval's ``include_path``).
        limit: score at most this many documents per task (lm-eval's ``limit``).
    """
    for path in task_paths:
        if not Path(path).is_dir():
            raise EvosearchError(f"--task-path {path} is not a folder of lm-eval task YAML files")
    with offline(), _quiet():
        try:
            import lm_eval
            import lm_eval.evaluator
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise EvosearchError('lm-eval tasks need lm-eval: pip install "evosearch[eval]"') from None
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or default_batch_size(model))
        include = [str(p) for p in task_paths]
        window_tokens = None
        if PERPLEXITY_TASK in tasks:
            if windows is None:
                raise EvosearchError(f"task {PERPLEXITY_TASK} needs the evaluation windows (evosearch eval's "
                                     f"--corpus, --tokens, --window)")
            folder, window_tokens = write_perplexity_task(lm, tokenizer, windows)
            include.insert(0, str(folder))
        manager = TaskManager(include_path=include or None)
        unknown = [name for name in tasks if name not in manager.all_tasks and not Path(name).is_file()]
        if unknown:
            raise EvosearchError(f"lm-eval has no task {unknown[0]!r}; `lm_eval ls tasks` lists them, and "
                                 f"--task-path DIR adds the YAML files in DIR")
        results = {}
        with _no_git_hash(lm_eval.evaluator):
            for name in tasks:  # one at a time, so that a failure names its task
                try:
                    output = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=limit,
                                                     bootstrap_iters=0, log_samples=False)
                except (FileNotFoundError, ConnectionError) as exc:
                    raise EvosearchError(f"lm-eval task {name}: {_missing(exc)}") from None
                results |= {task: _metrics(metrics) for task, metrics in output["results"].items()}
                if name == PERPLEXITY_TASK:  # the first windows, as many as --limit left
                    scored = output["n-samples"][name]["effective"]
                    results[name]["tokens"] = sum(window_tokens[:scored])
    return results


def write_perplexity_task(lm, tokenizer, windows: torch.Tensor) -> tuple[Path, list[int]]:
    """Write the windows as a JSONL file and a task YAML pointing at it; returns (folder, tokens lm-eval
    scores in each window).

    Each line is ``{"text": ..., "tokens": ...}``: a window decoded to text and the number
    of tokens lm-eval scores in it (its own tokenizer call, ``lm.tok_encode``). Retokenising
    reproduces a window exactly unless it was cut inside a run of characters the tokenizer
    merges (two newlines, say): then lm-eval scores a token fewer there, and the count says so.
    """
    lines, counts = [], []
    for window in windows.tolist():
        text = tokenizer.decode(window)
        counts.append(len(lm.tok_encode(text)))
        lines.append(json.dumps({"text": text, "tokens": counts[-1]}))
    data = "\n".join(lines) + "\n"
    if sum(counts) != windows.numel():
        log.info("lm-eval scores %d tokens where evosearch eval's windows hold %d (retokenising the text merges "
                 "tokens at some window edges)", sum(counts), windows.numel())
    folder = assets.cache_dir() / "lm-eval" / hashlib.sha256(data.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    _write_if_changed(folder / "windows.jsonl", data)
    task = {"include": str(TASKS_DIR / f"{PERPLEXITY_TASK}.yaml"), "task": PERPLEXITY_TASK,
            "dataset_kwargs": {"data_files": {"test": str(folder / "windows.jsonl")}}}
    _write_if_changed(folder / f"{PERPLEXITY_TASK}.yaml", json.dumps(task, indent=1) + "\n")  # JSON is YAML
    return folder, counts


def _write_if_changed(path: Path, text: str) -> None:
    """Rewrite only on change: datasets keys its cache of a data file on the file's modification time."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _metrics(record: dict) -> dict[str, float]:
    """lm-eval's ``{"word_perplexity,none": v, "word_perplexity_stderr,none": "N/A", ...}`` as ``{metric: v}``."""
    metrics = {}
    for key, value in record.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        metrics[metric if filter_name == "none" else key] = value
    return metrics


def _missing(exc: Exception) -> str:
    """One line for a file or dataset that is not on this machine."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    found = re.search(r"Unable to find '([^']+)'", message)
    if found:
        return f"data file {found[1]} does not exist (named in the task's dataset_kwargs.data_files)"
    return (f"{message}; evosearch runs lm-eval offline, so a task's data must be on this machine: point the task "
            f"at a local copy (docs/lm-eval.md)")


@contextmanager
def offline():
    """Switch off huggingface_hub's and datasets' network access, for this block only.

    Both read their switches at import; modules imported before the block get them set
    as attributes, modules imported inside it read them from the environment.
    """
    saved_env = {name: os.environ.get(name) for name in _OFFLINE_SWITCHES}
    os.environ.update({name: "1" for name in _OFFLINE_SWITCHES})
    saved_attrs = []
    for module_name in ("huggingface_hub.constants", "datasets.config"):
        module = sys.modules.get(module_name)
        for name in _OFFLINE_SWITCHES:
            if module is not None and hasattr(module, name):
                saved_attrs.append((module, name, getattr(module, name)))
                setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved_attrs:
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _no_git_hash(evaluator):
    """lm-eval records the commit of the current folder by running ``git describe``, whose "fatal: not a
    git repository" reaches stderr outside a checkout; evosearch keeps no such hash (it would be the
    user's folder's, not evosearch's), so for this block that record is None."""
    saved = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = saved


class _ModelObjectNotices(logging.Filter):
    """HFLM warns whenever it is given a model object rather than a name; evosearch always does."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("`pretrained` model kwarg is not of type", "Passed an already-initialized model"))


@contextmanager
def _quiet():
    """lm-eval logs every task's configuration at INFO; keep it to warnings, less HFLM's notices about model objects."""
    logger = logging.getLogger("lm_eval")
    hflm = logging.getLogger("lm_eval.models.huggingface")
    notices = _ModelObjectNotices()
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    hflm.addFilter(notices)
    try:
        yield
    finally:
        logger.setLevel(level)
        hflm.removeFilter(notices)
